"""The math task: GSM8K-format records read through `datasets`, prompts through the chat template, answers
checked by math-verify, drawn per rank and resumed exactly; each completion is scored against its own prompt."""

import importlib.util
import json
import tomllib
from pathlib import Path

import pytest
import torch

from rlsync.default_model import build_tokenizer
from rlsync.engine import Completion, PromptResult
from rlsync.errors import ConfigError
from rlsync.rl.gsm8k import SAMPLE, final_answer, gsm8k_records, math_reward
from rlsync.rl.records import PromptRenderer
from rlsync.rl.rollout import collect
from rlsync.rl.tasks import TaskConfig, make_task

REPO = Path(__file__).resolve().parents[2]
RECORDS = [{"question": "Ada has 3 pens and buys 4 more. How many pens?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
           {"question": "A box holds 1,000 beads. How many beads in 2 boxes?", "answer": "2 * 1000 = 2000\n#### 2,000"}]
CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")


def write_records(path: Path, records=RECORDS) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        import datasets

        datasets.Dataset.from_list(records).to_parquet(str(path))
    return path


def math_config(**kw) -> TaskConfig:
    return TaskConfig(name="gsm8k", prompt_length=kw.pop("prompt_length", 256), **kw)


def test_the_shipped_sample_is_what_its_script_generates_and_is_package_data():
    spec = importlib.util.spec_from_file_location("make_gsm8k_sample", REPO / "scripts" / "make_gsm8k_sample.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert SAMPLE.read_text(encoding="utf-8") == "".join(json.dumps(r) + "\n" for r in script.sample(128))
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(SAMPLE.relative_to(REPO / "rlsync").match(p) for p in package_data["rlsync"])


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_gsm8k_records_from_a_local_file(tmp_path, suffix):
    records = gsm8k_records(str(write_records(tmp_path / f"r{suffix}")), config_name=None, split="train")
    assert [r["answer"] for r in records] == ["7", "2000"]  # the number after '####', separators removed
    assert records[0]["prompt"] == [{"role": "user", "content": f"{RECORDS[0]['question']}\nPlease reason step by "
                                                                 "step, and put your final answer within \\boxed{}."}]


def test_gsm8k_records_refuse_what_is_not_gsm8k(tmp_path):
    bad = write_records(tmp_path / "q.jsonl", [{"question": "q", "solution": "#### 1"}])
    with pytest.raises(ConfigError, match=r"task.dataset: .* not in the GSM8K format: no answer column"):
        gsm8k_records(str(bad), config_name=None, split="train")
    bad = write_records(tmp_path / "a.jsonl", [RECORDS[0], {"question": "q", "answer": "it is 5"}])
    with pytest.raises(ConfigError, match=r"record 1 of .*ends in '#### <number>'"):
        gsm8k_records(str(bad), config_name=None, split="train")
    with pytest.raises(ConfigError, match="task.dataset_config: 'main' names a configuration"):
        gsm8k_records(str(write_records(tmp_path / "r.jsonl")), config_name="main", split="train")
    with pytest.raises(ConfigError, match="task.dataset: .*missing.jsonl: no such file"):  # never a hub lookup
        gsm8k_records(str(tmp_path / "missing.jsonl"), config_name=None, split="train")
    (tmp_path / "r.txt").write_text("x")
    with pytest.raises(ConfigError, match="task.dataset: .*r.txt is a file rlsync cannot read"):
        gsm8k_records(str(tmp_path / "r.txt"), config_name=None, split="train")
    assert final_answer("a\n#### 1,234 ") == "1234"


def test_math_reward_accepts_the_formats_a_model_answers_in_and_refuses_wrong_answers():
    right = ["The answer is \\boxed{72}.", "so 70 + 2 = 72\n#### 72", "She has 72 clips.", "\\boxed{72.0}",
             "\\boxed{\\frac{144}{2}}", "$72$"]
    wrong = ["#### 71", "\\boxed{27}", "", "no number here", "\\boxed{7.2}"]
    assert math_reward(right + wrong, ["72"] * 11) == [1.0] * 6 + [0.0] * 5
    assert math_reward(["#### 2,000", [{"role": "assistant", "content": "\\boxed{2000}"}]], ["2000", "2000"]) == [1.0, 1.0]


def test_every_sample_solution_is_right_and_a_shifted_answer_wrong():
    lines = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    records = gsm8k_records(None, config_name=None, split="train")
    assert len(records) == len(lines) == 128
    golds = [r["answer"] for r in records]
    assert math_reward([line["answer"] for line in lines], golds) == [1.0] * 128
    assert math_reward([f"\\boxed{{{int(g) + 1}}}" for g in golds], golds) == [0.0] * 128


def bos_tokenizer(template: str | None):
    """The tiny character tokenizer, made to add BOS itself (as Llama's does), with an optional chat template."""
    from tokenizers import processors

    tok = build_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    tok.chat_template = template
    return tok


def test_prompts_go_through_the_chat_template_without_a_second_bos():
    messages = [{"role": "user", "content": "what is 2+2?"}]
    tok = bos_tokenizer("{{ bos_token }}" + CHAT)
    render = PromptRenderer(tok)
    text = render(messages)
    assert render.templated and text == "<user>what is 2+2?</user><assistant>"
    templated_ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert tok(text)["input_ids"] == templated_ids["input_ids"]  # one BOS: the tokenizer's, as the template means
    assert tok(text)["input_ids"].count(tok.bos_token_id) == 1
    plain = PromptRenderer(build_tokenizer())  # the built-in tokenizer: no chat template, no BOS added
    assert not plain.templated and plain(messages) == "what is 2+2?" and plain("as is") == "as is"
    with pytest.raises(ValueError, match="a record's prompt must be text or a list of"):
        plain([{"role": "user"}])


def test_the_math_task_draws_each_record_once_per_epoch_in_an_order_per_seed_and_resumes_exactly(tmp_path):
    tok = build_tokenizer()
    tok.chat_template = CHAT
    task = make_task(math_config(), seed=0, tokenizer=tok)
    epoch = task.prompts(128)
    assert sorted(p.record["answer"] for p in epoch) == sorted(r["answer"] for r in gsm8k_records(
        None, config_name=None, split="train"))
    assert all(p.startswith("<user>") and p.endswith("</user><assistant>") for p in epoch)
    assert [p.record["answer"] for p in make_task(math_config(), seed=1, tokenizer=tok).prompts(8)] != [
        p.record["answer"] for p in epoch[:8]]  # another rank (seed + rank) draws another order

    task.prompts(5)  # into the second epoch
    state = task.state_dict()
    assert state == {"epoch": 1, "position": 5, "num_records": 128}
    expected = task.prompts(200)  # across the next epoch boundary
    resumed = make_task(math_config(), seed=0, tokenizer=tok)
    resumed.load_state_dict(torch.load(_saved(tmp_path, state), weights_only=True))
    assert resumed.prompts(200) == expected
    fewer = make_task(math_config(dataset=str(write_records(tmp_path / "r.jsonl"))), seed=0, tokenizer=tok)
    with pytest.raises(ConfigError, match="resume: task gsm8k now has 2 prompts, the checkpoint drew from 128"):
        fewer.load_state_dict(state)


def _saved(tmp_path, state):
    torch.save(state, tmp_path / "task.pt")
    return tmp_path / "task.pt"


def test_prompts_longer_than_the_bound_are_skipped_and_none_left_is_an_error(tmp_path):
    path = str(write_records(tmp_path / "r.jsonl"))
    tok = build_tokenizer()
    lengths = [len(tok(p)["input_ids"]) for p in make_task(math_config(dataset=path), 0, tokenizer=tok).prompts(2)]
    kept = make_task(math_config(dataset=path, prompt_length=min(lengths)), 0, tokenizer=tok)
    assert len(set(kept.prompts(4))) == 1
    with pytest.raises(ConfigError, match=r"task.prompt_length: no prompt of task gsm8k fits in 10 tokens"):
        make_task(math_config(dataset=path, prompt_length=10), 0, tokenizer=tok)
    with pytest.raises(ValueError, match="make_task needs the tokenizer"):
        make_task(math_config(dataset=path), 0)


class AnsweringEngine:
    """Answers the i-th prompt of a call right in its first completion and wrong in the others."""

    tp_rank = 0

    def __init__(self, tokenizer, answers):
        self.tokenizer, self.answers = tokenizer, answers

    @staticmethod
    def gather_in_group(obj):
        return [obj]  # a one-rank engine

    def generate(self, prompts, *, n, **_):
        results = []
        for ids, gold in zip(prompts, self.answers, strict=True):
            texts = [f"so #### {gold}"] + [f"so #### {int(gold) + 1 + i}" for i in range(n - 1)]
            results.append(PromptResult(prompt_token_ids=list(ids), completions=[
                Completion(token_ids=self.tokenizer(t)["input_ids"], logprobs=[-1.0] * len(t), text=t) for t in texts]))
        return results


def test_collect_scores_each_completion_against_its_own_prompt_and_logs_success():
    tok = build_tokenizer()
    task = make_task(math_config(), seed=0, tokenizer=tok)
    answers = [p.record["answer"] for p in make_task(math_config(), seed=0, tokenizer=tok).prompts(6)]  # same draw
    assert len(set(answers)) > 1
    rollout = collect(AnsweringEngine(tok, answers), task, tok, num_prompts=6, n=3, max_tokens=8, temperature=1.0,
                      seed=0, step=1)
    assert rollout.rewards.tolist() == [1.0, 0.0, 0.0] * 6
    assert task.step_metrics() == {"success": pytest.approx(1 / 3)}
