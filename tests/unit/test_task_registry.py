"""The task / reward registry: a script registers tasks and rewards, configs name them (never code); unknown and
duplicate names are clear errors; the example script's task validates, draws and scores."""

import importlib.util
import random
from pathlib import Path

import pytest

from rlsync.cli import load_recipe_config, main
from rlsync.errors import ConfigError
from rlsync.rl import tasks
from rlsync.rl.tasks import TaskConfig, make_task, register_reward, register_task, registered_rewards, registered_tasks

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "grpo" / "tiny_cpu_fp8.yaml"


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    """Each test registers into copies of the tables; the built-ins stay as they were for the next test."""
    monkeypatch.setattr(tasks, "_TASKS", dict(tasks._TASKS))
    monkeypatch.setattr(tasks, "_REWARDS", dict(tasks._REWARDS))


def echo_records(config: TaskConfig):
    return [{"prompt": f"say {word}:", "word": word} for word in ("yes", "no", "maybe")]


def says_word(completions, word, **_):
    return [1.0 if w in c else 0.0 for c, w in zip(completions, word)]


def test_builtins_are_registered():
    assert {"vowels", "gsm8k"} <= set(registered_tasks()) and {"vowels", "math"} <= set(registered_rewards())


def test_a_registered_task_runs_by_name_from_a_config_and_its_rewards_see_the_record_columns(tmp_path):
    calls = []

    @register_reward("length_bonus")
    def length_bonus(prompts, completions, **columns):
        calls.append((prompts, sorted(columns)))
        return [0.5] * len(completions)

    register_task("echo", records=echo_records, rewards=[says_word, "length_bonus"], success=says_word,
                  description="say the word")
    assert registered_tasks()["echo"] == "say the word"
    _, cfg = load_recipe_config(CONFIG, ["task.name=echo", "task.prompt_length=12"])
    from rlsync.default_model import build_tokenizer

    task = make_task(cfg.task, seed=0, tokenizer=build_tokenizer())
    prompts = task.prompts(3)
    assert sorted(prompts) == ["say maybe:", "say no:", "say yes:"]
    completions = [p.record["word"] if i else "nothing" for i, p in enumerate(prompts)]
    assert task.rewards(prompts, completions) == [0.5, 1.5, 1.5]  # says_word + length_bonus, summed
    assert task.step_metrics() == {"success": pytest.approx(2 / 3)}
    assert calls == [([str(p) for p in prompts], ["word"])]  # trl's form: prompts, completions, one list per column

    _, cfg = load_recipe_config(CONFIG, ["task.name=echo", "task.prompt_length=12", "task.rewards=[length_bonus]"])  # replace the rewards
    task = make_task(cfg.task, seed=0, tokenizer=build_tokenizer())
    prompts = task.prompts(3)
    assert task.rewards(prompts, ["x"] * 3) == [0.5] * 3 and task.step_metrics() == {"success": 0.0}


def test_unknown_names_list_the_registered_ones(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"task.name: 'gsm8' is not a registered task \(did you mean 'gsm8k'\?\); "
                                          r"registered: gsm8k, vowels; register your own with rlsync.rl.tasks"):
        load_recipe_config(CONFIG, ["task.name=gsm8"])
    with pytest.raises(ConfigError, match=r"task.rewards: 'maths' is not a registered reward .*registered: math, "):
        load_recipe_config(CONFIG, ["task.rewards=[maths]"])
    assert main(["run", str(CONFIG), "task.name=my_task", f"run.output_dir={tmp_path}"]) == 2
    assert "task.name: 'my_task' is not a registered task" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_duplicates_and_malformed_registrations_are_refused():
    register_task("echo", records=echo_records, rewards=[says_word])
    with pytest.raises(ValueError, match="task 'echo' is already registered; pick another name, or pass replace=True"):
        register_task("echo", records=echo_records, rewards=[says_word])
    register_task("echo", records=echo_records, rewards=["vowels"], replace=True)
    assert tasks.task_spec("echo").rewards == (tasks.vowel_share,)
    with pytest.raises(ValueError, match="reward 'math' is already registered"):
        register_reward("math", says_word)
    with pytest.raises(ValueError, match="give exactly one of records= and generate="):
        register_task("both", records=echo_records, generate=lambda rng, cfg: {"prompt": "x"}, rewards=[says_word])
    with pytest.raises(ValueError, match="give exactly one of records= and generate="):
        register_task("neither", rewards=[says_word])
    with pytest.raises(ValueError, match="a task name is letters, digits"):
        register_task("my task", records=echo_records, rewards=[says_word])
    with pytest.raises(ConfigError, match="reward: 'nope' is not a registered reward"):
        register_task("x", records=echo_records, rewards=["nope"])
    assert "x" not in registered_tasks()


def test_config_keys_a_task_cannot_use_and_rewards_of_the_wrong_length_are_errors():
    with pytest.raises(ConfigError, match="task.dataset: the vowels task generates its prompts and reads no dataset"):
        load_recipe_config(CONFIG, ["task.dataset=openai/gsm8k"])
    register_task("short", generate=lambda rng, cfg: {"prompt": "a:"}, rewards=[lambda completions, **_: [1.0]])
    task = make_task(TaskConfig(name="short"), seed=0)
    with pytest.raises(ValueError, match=r"returned 1 values for 2 completions"):
        task.rewards(task.prompts(2), ["a", "b"])


def test_the_example_script_registers_a_task_that_validates_draws_and_scores():
    spec = importlib.util.spec_from_file_location("custom_task", REPO / "examples" / "custom_task.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)  # registers `addition` and `brevity`; main() runs only as a script
    _, cfg = load_recipe_config(CONFIG, ["task.name=addition"])
    task = make_task(cfg.task, seed=0)
    prompts = task.prompts(4)
    assert all(len(p) <= cfg.task.prompt_length and p.endswith("=") for p in prompts)
    right = [p.record["answer"] for p in prompts]
    assert task.rewards(prompts, right) == [1.0 + 0.1 * (1 - len(a) / 12) for a in right]
    assert task.rewards(prompts, ["no" * 6] * 4) == [0.0] * 4 and task.step_metrics() == {"success": 0.0}
    assert make_task(cfg.task, seed=0).prompts(4) == prompts and make_task(cfg.task, seed=1).prompts(4) != prompts
    state = task.state_dict()
    again = make_task(cfg.task, seed=5)
    again.load_state_dict(state)
    assert again.prompts(3) == task.prompts(3)
    assert example.addition(random.Random(0), cfg.task)["prompt"].endswith("=")
