"""Data sources and experiment trackers are registered parts with sections of their own, as losses
and engines are: a plugin adds one with its own knobs, the old spellings still load, and an
unknown name is a one-line error with "did you mean"."""

from __future__ import annotations

import json
from typing import Literal

import pytest
import yaml

import urlvr
from conftest import small_run_recipe
from urlvr.data.loaders import DATA_SOURCES, ArithmeticSource, DataSourceSection, FileSource
from urlvr.data.records import DataError, PromptRecord
from urlvr.metrics.loggers import TRACKERS, TensorBoardTracker, TrackerSection, WandbTracker
from urlvr.recipe import Recipe, RecipeError, load_recipe


def error_of(recipe: dict, *overrides: str) -> str:
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe, overrides)
    return str(err.value)


def test_a_plugin_source_and_a_plugin_tracker_train_through_a_recipe(random_tiny_model, tmp_path):
    import part_plugins

    part_plugins.TRACKED.clear()
    recipe = small_run_recipe(random_tiny_model[0], tmp_path / "run", plugins=["part_plugins"],
                              data={"source": {"kind": "test_squares", "count": 6, "start": 3}},
                              logging={"console": False, "trackers": [{"name": "test_memory", "label": "mine"}]},
                              trainer={"total_steps": 1})
    result = urlvr.train(recipe)
    (tracked,) = part_plugins.TRACKED
    assert tracked["label"] == "mine" and tracked["closed"]  # the tracker's own knob reached it; closed at the end
    assert tracked["run_dir"] == result.run_dir and tracked["config"]["data"]["source"]["kind"] == "test_squares"
    assert [step for step, _ in tracked["logged"]] == [1]
    assert {"step": 1, **tracked["logged"][0][1]} == result.metrics[0]  # what metrics.jsonl holds for the step
    completions = [json.loads(line) for line in (result.run_dir / "completions.jsonl").read_text().splitlines()]
    assert completions and {row["prompt_id"] for row in completions} <= {f"sq-{n}" for n in range(3, 9)}
    saved = yaml.safe_load((result.run_dir / "recipe.yaml").read_text())
    assert saved["data"]["source"] == {"kind": "test_squares", "count": 6, "start": 3}
    assert saved["logging"]["trackers"] == [{"name": "test_memory", "label": "mine"}]
    assert load_recipe(saved).data.source == load_recipe(recipe).data.source  # the run folder's recipe reloads


def test_a_plugin_source_shows_in_the_schema_and_its_knobs_are_checked():
    import part_plugins  # noqa: F401  (registers test_squares and test_memory)

    schema = json.dumps(Recipe.model_json_schema())  # what `urlvr schema` prints
    assert '"const": "test_squares"' in schema and '"const": "test_memory"' in schema
    message = error_of({"plugins": ["part_plugins"], "data": {"source": {"kind": "test_squares", "cout": 3}}})
    assert message == ("<dict>: data.source.test_squares.cout: unknown field 'cout'; did you mean 'count'? "
                       "(known: count, kind, start)")
    message = error_of({"plugins": ["part_plugins"], "logging": {"trackers": [{"name": "test_memory", "labl": "x"}]}})
    assert message == ("<dict>: logging.trackers.0.labl: unknown field 'labl'; did you mean 'label'? "
                       "(known: label, name)")


def test_the_old_spellings_still_load():
    source = load_recipe({"data": {"source": {"kind": "arithmetic", "num_problems": 64}}}).data.source
    assert source == ArithmeticSource(num_problems=64)
    assert load_recipe({"data": {"source": "countdown"}}, ["data.source.num_problems=3"]).data.source.num_problems == 3
    old = {"logging": {"wandb": {"enabled": True, "project": "mine", "mode": "offline"},
                       "tensorboard": {"enabled": True, "log_dir": "tb"}}}
    assert load_recipe(old).logging.trackers == [WandbTracker(project="mine", mode="offline"),
                                                 TensorBoardTracker(log_dir="tb")]
    # a run folder's recipe.yaml written before trackers were variants: both off, nothing added
    off = {"logging": {"console": True, "wandb": {"enabled": False, "project": "urlvr", "entity": None, "mode": "auto"},
                       "tensorboard": {"enabled": False, "log_dir": None}}}
    assert load_recipe(off).logging.trackers == []
    new = load_recipe({"logging": {"trackers": [{"name": "wandb", "project": "mine", "mode": "offline"},
                                                {"name": "tensorboard", "log_dir": "tb"}]}})
    assert new == load_recipe(old)
    assert load_recipe(yaml.safe_load(yaml.safe_dump(new.model_dump(mode="json")))) == new
    assert error_of({"logging": {"wandb": {"enabled": True}, "trackers": ["wandb"]}}) == (
        "<dict>: logging: trackers: wandb given twice (one run, one tracker of each name)")
    assert error_of({"logging": {"wandb": {"enabld": True}}}) == (
        "<dict>: logging.wandb.enabld: unknown field 'enabld'; did you mean 'enabled'? (known: enabled, entity, mode, project)")


@pytest.mark.parametrize(("recipe", "message"), [
    ({"data": {"source": {"kind": "arithmetc"}}},
     "<dict>: data.source: unknown data source 'arithmetc'; did you mean 'arithmetic'? (known: adapter, arithmetic, "
     "countdown, datasets, file, reasoning_gym)"),
    ({"eval": {"at_end": True, "source": {"kind": "countdown"}, "held_out": {"more": {"kind": "fil", "path": "x"}}}},
     "<dict>: eval.held_out.more: unknown data source 'fil'; did you mean 'file'? (known: adapter, arithmetic, "
     "countdown, datasets, file, reasoning_gym)"),
    ({"data": {"source": {"num_problems": 3}}},
     "<dict>: data.source: no `kind`: name the data source (known: adapter, arithmetic, countdown, datasets, file, "
     "reasoning_gym)"),
    ({"logging": {"trackers": ["tensorbord"]}},
     "<dict>: logging.trackers.0: unknown tracker 'tensorbord'; did you mean 'tensorboard'? (known: tensorboard, wandb)"),
    ({"logging": {"trackers": [{"project": "mine"}]}},
     "<dict>: logging.trackers.0: no `name`: name the tracker (known: tensorboard, wandb)"),
])
def test_an_unknown_or_missing_name_is_one_line_with_the_known_ones(recipe, message):
    # a plugin imported earlier in this session (a test's, a docs page's) adds to the known ones
    error = error_of(recipe)
    head, known = message.removesuffix(")").split(" (known: ")
    assert error.startswith(head + " (known: ") and error.endswith(")") and "\n" not in error, error
    assert set(known.split(", ")) <= set(error.removeprefix(head + " (known: ")[:-1].split(", ")), error


def test_registration_refuses_a_source_whose_read_drops_a_knob_or_a_misnamed_part():
    class DropsAKnob(DataSourceSection):
        kind: Literal["test_drops"] = "test_drops"
        count: int = 1
        """How many."""
        colour: str = "red"
        """Never read."""

        @staticmethod
        def read(count: int) -> list[PromptRecord]:
            return []

    class TakesAnything(DataSourceSection):
        kind: Literal["test_anything"] = "test_anything"
        count: int = 1
        """How many."""

        @staticmethod
        def read(**knobs) -> list[PromptRecord]:
            return []

    class NeedsMore(DataSourceSection):
        kind: Literal["test_needs_more"] = "test_needs_more"
        count: int = 1
        """How many."""

        @staticmethod
        def read(count: int, colour: str) -> list[PromptRecord]:
            return []

    class Misnamed(TrackerSection):
        name: Literal["other"] = "other"

    with pytest.raises(ValueError, match=r"data source 'test_drops': read\(\) must take each knob by name.*missing: colour"):
        DATA_SOURCES.register("test_drops")(DropsAKnob)
    with pytest.raises(ValueError, match=r"data source 'test_anything': read\(\) must take each knob by name"):
        DATA_SOURCES.register("test_anything")(TakesAnything)
    with pytest.raises(ValueError, match=r"data source 'test_needs_more': read\(\) requires colour, which is no knob"):
        DATA_SOURCES.register("test_needs_more")(NeedsMore)
    with pytest.raises(ValueError, match="registered as 'mine' but its section's `kind` defaults to 'file'"):
        DATA_SOURCES.register("mine")(FileSource)
    with pytest.raises(ValueError, match="registered as 'test_other' but its section's `name` defaults to 'other'"):
        TRACKERS.register("test_other")(Misnamed)
    assert not {"test_drops", "test_anything", "mine"} & set(DATA_SOURCES.names()) and "test_other" not in TRACKERS


def test_a_run_folder_recorded_with_the_old_tracker_spelling_compares_equal(tmp_path):
    """A resume (or a sweep) reads the run folder's recipe.yaml in today's spelling: the
    `logging.wandb` / `logging.tensorboard` sections an older urlvr wrote are no change."""
    from urlvr.recipe.changes import recipe_changes
    from urlvr.trainer.resume import resume_changes

    recipe = load_recipe({"logging": {"trackers": [{"name": "tensorboard", "log_dir": "tb"}]}})
    old = recipe.model_dump(mode="json")
    old["logging"] = {"console": True, "completions_per_step": 4,
                      "wandb": {"enabled": False, "project": "urlvr", "entity": None, "mode": "auto"},
                      "tensorboard": {"enabled": True, "log_dir": "tb"}}  # as recipe.yaml held it
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    assert recipe_changes(old, recipe.model_dump(mode="json"))  # read as written, the spelling differs
    assert resume_changes(tmp_path, recipe, step=1) == []
    moved = load_recipe(recipe, ["logging.trackers=[]"])
    assert [str(c) for c in resume_changes(tmp_path, moved, step=1)] == [
        'logging.trackers: [{"name": "tensorboard", "log_dir": "tb"}] -> []']


@pytest.mark.parametrize("trackers", [None, "tensorboard", {"name": "tensorboard"}])
def test_old_tracker_spelling_beside_trackers_that_are_not_a_list_is_the_lists_error(trackers):
    # the old `wandb: {enabled: true}` was merged by unpacking `trackers`: null raised a TypeError
    # (exit 1), a name became one tracker per letter, a mapping one per key
    error = error_of({"logging": {"wandb": {"enabled": True}, "trackers": trackers}})
    assert error.startswith("<dict>: logging.trackers: Input should be a valid list") and "\n" not in error, error


def _plugin_source(kind: str, read):
    section = type(f"Source_{kind}", (DataSourceSection,), {
        "__annotations__": {"kind": Literal[kind], "count": int}, "kind": kind, "count": 2,
        "__doc__": "A test source.", "read": staticmethod(read)})
    return DATA_SOURCES.register(kind)(section)


def _raises(count: int):
    raise KeyError("q")


@pytest.mark.parametrize(("read", "message"), [
    (_raises, "data source 'test_bad_{n}': read failed: KeyError: 'q'"),
    (lambda count: [{"prompt_id": "a", "prompt": "x"}], "data source 'test_bad_{n}': read() item 0 is a dict, not a "
                                                       "urlvr.data.records.PromptRecord"),
    (lambda count: 3, "data source 'test_bad_{n}': read() returned a int, not a list of PromptRecords"),
    (lambda count: [PromptRecord("same", "x"), PromptRecord("b", "y"), PromptRecord("same", "z")],
     "data source 'test_bad_{n}': duplicate prompt id 'same' (items 0 and 2); ids must be unique for per-prompt "
     "tracking and resume"),
    (lambda count: None, "data source 'test_bad_{n}' gave no prompts (options: {{'count': 2}})"),
])
def test_a_plugin_sources_bad_read_is_a_data_error_naming_it(read, message):
    # before: a KeyError or AttributeError (exit 1, no source named), duplicate ids trained silently
    n = len(DATA_SOURCES.names())
    source = _plugin_source(f"test_bad_{n}", read)
    with pytest.raises(DataError) as err:
        source().load()
    assert str(err.value) == message.format(n=n)


def test_a_plugin_source_may_yield_its_records():
    source = _plugin_source("test_yields", lambda count: (PromptRecord(f"q{i}", "x") for i in range(count)))
    assert [r.prompt_id for r in source(count=3).load()] == ["q0", "q1", "q2"]


def test_registration_refuses_a_tracker_without_its_own_open():
    # before: accepted, and the run failed at its start (NotImplementedError) or later
    class NoOpen(TrackerSection):
        name: Literal["test_no_open"] = "test_no_open"

    class NotASection:
        name = "test_plain"

        def open(self, run_dir, config):
            return None

    for name, entry in [("test_no_open", NoOpen), ("test_plain", NotASection)]:
        with pytest.raises(TypeError, match=f"tracker '{name}': .* must subclass urlvr.metrics.loggers.TrackerSection "
                                            r"and define open\(run_dir, config\)"):
            TRACKERS.register(name)(entry)
    assert not {"test_no_open", "test_plain"} & set(TRACKERS.names())


def test_a_tracker_whose_open_returns_no_logger_is_refused_when_it_starts(tmp_path):
    from urlvr.metrics.loggers import make_trackers

    @TRACKERS.register("test_returns_none")
    class ReturnsNone(TrackerSection):
        name: Literal["test_returns_none"] = "test_returns_none"

        def open(self, run_dir, config):
            return None  # before: accepted, then an AttributeError at the end of step 1

    recipe = load_recipe({"logging": {"trackers": ["test_returns_none"]}})
    with pytest.raises(TypeError, match=r"logging.trackers: test_returns_none's open\(\) returned NoneType, not a "
                                        r"MetricsLogger"):
        make_trackers(recipe, tmp_path)


@pytest.mark.parametrize("tracker", [{"name": "tensorboard", "log_dir": ""}, {"name": "wandb", "project": ""}])
def test_an_empty_tracker_folder_or_project_is_refused(tracker):
    # before: an empty log_dir silently meant the default folder; an empty project was left to wandb
    knob = next(k for k in tracker if k != "name")
    assert error_of({"logging": {"trackers": [tracker]}}).startswith(
        f"<dict>: logging.trackers.0.{knob}: String should have at least 1 character")
