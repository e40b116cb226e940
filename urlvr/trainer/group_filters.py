"""The group filters, at their old path: they live in `urlvr.algorithms.group_filters`."""

from urlvr.algorithms.group_filters import (  # noqa: F401
    GROUP_FILTERS,
    AgreementFilter,
    GroupFilter,
    NoFilter,
    ZeroVarianceFilter,
    agreement,
    select_groups,
    zero_variance_groups,
)
