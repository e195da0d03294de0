"""``llmchat finetune``: P-tuning v2 training (llmchat.finetune, THUDM ptuning/main.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmchat.finetune.args import parse_args
from llmchat.finetune.data import Example, eval_features, train_features
from llmchat.finetune.run import main
from tests.checkpoints import REPO, build_state_dict, chatglm2_checkpoint, chatglm2_config, shared

SEED = ("--do_train --train_file SpamClassify/train.json --validation_file SpamClassify/dev.json "
        "--prompt_column content --response_column label --overwrite_cache "
        "--model_name_or_path ../../chatglm-6b "
        "--output_dir output/spamclassify-chatglm-6b-pt-4-2e-2 "
        "--overwrite_output_dir --max_source_length 64 --max_target_length 64 "
        "--per_device_train_batch_size 1 --per_device_eval_batch_size 1 "
        "--gradient_accumulation_steps 16 --predict_with_generate --max_steps 300 "
        "--logging_steps 10 --save_steps 100 --learning_rate 2e-2 --pre_seq_len 128 "
        "--quantization_bit 8").split()


def env() -> dict[str, str]:
    """The subprocess environment, read after conftest's isolation (LLMCHAT_HOME, HF_HOME)."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _keep_threads():  # type: ignore[no-untyped-def]
    """``--threads 1`` sets torch's thread count for this process: restore it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def soften(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights 5x smaller than the shared tiny checkpoints' (std 0.1, closer to a trained
    model's scale), so a prefix can steer the tiny model within a few steps."""
    return {k: v if ("norm" in k or "inv_freq" in k) else v * 0.2 for k, v in sd.items()}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from llmchat.models import chatglm2
    from tests.ckpt_chatglm import chatglm_checkpoint, chatglm_config, chatglm_state_dict

    root = tmp_path_factory.mktemp("ft")
    sd2 = soften(build_state_dict(chatglm2.Model, chatglm2.Config.from_hf(chatglm2_config())))
    return {"glm": chatglm_checkpoint(root / "glm", fmt="bin",
                                      state_dict=soften(chatglm_state_dict(chatglm_config()))),
            "glm2": chatglm2_checkpoint(root / "glm2", fmt="bin", state_dict=sd2),
            "root": root}


def tokenizer(family: str):  # type: ignore[no-untyped-def]
    from llmchat.models import chatglm, chatglm2

    if family == "glm":
        return chatglm.load_tokenizer(shared("tokenizers/chatglm-6b"))
    return chatglm2.load_tokenizer(shared("tokenizers/chatglm2-6b"))


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def argv(base: Path, out: Path, train: Path, *extra: str) -> list[str]:
    return ["--do_train", "--train_file", str(train), "--prompt_column", "content",
            "--response_column", "label", "--model_name_or_path", str(base),
            "--output_dir", str(out), "--pre_seq_len", "4", "--device", "cpu",
            "--dtype", "float32", "--threads", "1", *extra]


# -- the command line --------------------------------------------------------------------------
def test_seed_command_line_parses_as_is() -> None:
    a = parse_args(SEED)
    assert (a.do_train, a.overwrite_output_dir, a.predict_with_generate, a.do_eval) == (
        True, True, True, False)
    assert (a.max_source_length, a.max_target_length, a.val_max_target_length) == (64, 64, 64)
    assert (a.gradient_accumulation_steps, a.max_steps, a.save_steps, a.logging_steps) == (
        16, 300, 100, 10)
    assert (a.learning_rate, a.pre_seq_len, a.quantization_bit) == (2e-2, 128, 8)
    assert (a.prompt_column, a.response_column, a.output_dir) == (
        "content", "label", "output/spamclassify-chatglm-6b-pt-4-2e-2")
    # HF defaults the seed relies on
    assert (a.weight_decay, a.adam_beta1, a.adam_beta2, a.adam_epsilon, a.max_grad_norm,
            a.seed, a.lr_scheduler_type, a.warmup_steps) == (
        0.0, 0.9, 0.999, 1e-8, 1.0, 42, "linear", 0)
    dashed = [x.replace("_", "-") if x.startswith("--") else x for x in SEED]
    assert vars(parse_args(dashed)) == vars(a)
    b = parse_args([*SEED, "--do_train", "false", "--do_eval", "--no_ignore_pad_token_for_loss",
                    "--device", "cuda:1"])
    assert (b.do_train, b.do_eval, b.ignore_pad_token_for_loss, b.device) == (
        False, True, False, "cuda:1")


def test_cli_runs_the_seed_command_and_refuses_a_qwen_base(tmp_path: Path) -> None:
    from tests.ckpt_qwen import qwen_config

    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps(qwen_config()))
    (tmp_path / "SpamClassify").mkdir()
    for name in ("train.json", "dev.json"):
        write_jsonl(tmp_path / "SpamClassify" / name, [{"content": "加微信领红包", "label": "1"}])
    args = [a if a != "../../chatglm-6b" else str(qwen) for a in SEED]
    res = subprocess.run([sys.executable, "-m", "llmchat", "finetune", *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env=env())
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert "qwen-7b-chat checkpoint" in lines[0] and "ChatGLM-6B and ChatGLM2-6B" in lines[0]


def test_visualglm_base_and_bad_flags_are_one_line(tmp_path: Path, capsys) -> None:
    from tests.ckpt_visualglm import visualglm_config

    vis = tmp_path / "vis"
    vis.mkdir()
    (vis / "config.json").write_text(json.dumps(visualglm_config()))
    train = write_jsonl(tmp_path / "t.json", [{"content": "a", "label": "1"}])
    assert main(argv(vis, tmp_path / "o", train)) == 1
    assert "visualglm-6b checkpoint" in capsys.readouterr().err
    assert main([*argv(vis, tmp_path / "o", train), "--no_such_flag", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--no_such_flag" in err and "\n" not in err


# -- preprocessing -----------------------------------------------------------------------------
# Expected ids, derived by hand from upstream ptuning/main.py (preprocess_function_train/_eval)
# and the tokenizers' build_inputs_with_special_tokens: ChatGLM-6B appends [gMASK]=130001
# <sop>=130004 to the prompt and <eop>=130005 after the answer, its labels are -100 for
# context_length (= index of <sop>) positions then input_ids[mask_position + 1:]; ChatGLM2
# prepends [gMASK]=64790 sop=64792, ends with </s>=2, and masks the whole prompt. The text ids
# are sentencepiece's on the real tokenizer files (ChatGLM-6B after its "\n" -> "<n>"=4 step):
# "你好" = [5, 74874] (REFERENCE §6), "垃圾" = [5, 66491], "1" = [5, 9], ":"/"：" = 12; ChatGLM2
# "[Round 1]\n\n问：你好\n\n答：" = [790 ... 31211] (REFERENCE §6), "垃圾" = [30910, 32963].
GLM2_R1 = [790, 30951, 517, 30910, 30939, 30996, 13, 13, 54761, 31211, 39701, 13, 13, 55437,
           31211]
GOLDEN = [
    # family, example, kwargs, input_ids, labels
    ("glm", Example("你好", "垃圾", None, 1), {},
     [5, 74874, 130001, 130004, 5, 66491, 130005],
     [-100, -100, -100, 130004, 5, 66491, 130005]),
    ("glm", Example("你好", "1", None, 1), {"max_source": 2, "max_target": 3},  # a: 1, b: 1
     [5, 130001, 130004, 5, 130005], [-100, -100, 130004, 5, 130005]),
    ("glm", Example("你好", "1", [("在吗", "在")], 1), {},  # [Round 0]\n问：在吗\n答：在\n[Round 1]
     [53, 6945, 5, 8, 42, 4, 64286, 12, 63827, 63964, 4, 67342, 12, 63827, 4, 52, 6945, 5, 9,
      42, 4, 64286, 12, 74874, 4, 67342, 12, 130001, 130004, 5, 9, 130005],
     [-100] * 28 + [130004, 5, 9, 130005]),
    ("glm", Example("你好", "1", None, 1), {"source_prefix": "分类："},
     [5, 66787, 12, 74874, 130001, 130004, 5, 9, 130005],
     [-100] * 5 + [130004, 5, 9, 130005]),
    ("glm2", Example("你好", "垃圾", None, 1), {},
     [64790, 64792, *GLM2_R1, 30910, 32963, 2], [-100] * 17 + [30910, 32963, 2]),
    ("glm2", Example("你好", "垃圾", None, 1), {"max_source": 5, "max_target": 1},
     [64790, 64792, 790, 30951, 517, 30910, 2], [-100] * 5 + [30910, 2]),
    ("glm2", Example("你好", "1", [("在吗", "在")], 1), {},  # Round 1 history, Round 2 query
     [64790, 64792, 790, 30951, 517, 30910, 30939, 30996, 13, 13, 54761, 31211, 54534, 55398,
      13, 13, 55437, 31211, 54534, 13, 13, 30995, 30951, 517, 30910, 30943, 30996, 13, 13,
      54761, 31211, 39701, 13, 13, 55437, 31211, 30910, 30939, 2],
     [-100] * 36 + [30910, 30939, 2]),
]


@pytest.mark.parametrize("family,ex,kw,ids,labels", GOLDEN)
def test_train_preprocessing_golden_ids(family, ex, kw, ids, labels) -> None:
    opts = {"source_prefix": "", "max_source": 64, "max_target": 64, **kw}
    f = train_features(ex, tokenizer(family), family == "glm2", **opts)
    assert f.input_ids == ids
    assert f.labels == labels


def test_eval_preprocessing_golden_ids() -> None:
    # tokenizer(text, max_length, truncation=True): the text keeps max_length - 2 ids
    ex = Example("你好", "垃圾", None, 1)
    assert eval_features(ex, tokenizer("glm"), False, source_prefix="", max_source=3,
                         max_target=64) == ([5, 130001, 130004], [5, 66491])
    assert eval_features(ex, tokenizer("glm2"), True, source_prefix="", max_source=64,
                         max_target=3) == ([64790, 64792, *GLM2_R1], [30910])
    # the eval prompt of ChatGLM-6B is the bare query when the history is empty
    assert eval_features(Example("你好", "1", [], 1), tokenizer("glm"), False, source_prefix="",
                         max_source=64, max_target=64)[0] == [5, 74874, 130001, 130004]


# -- the loss and its gradients ----------------------------------------------------------------
def reference_loss(chat, encoder, rows) -> float:  # type: ignore[no-untyped-def]
    """Cross entropy from the inference path (prefix in the KV cache, one row at a time, no
    padding), averaged over every supervised token of the batch, in float64."""
    from llmchat.finetune.train import dims_of
    from llmchat.ptuning import prefix_kv

    d = dims_of(chat.module.__name__, chat.model.config)
    k, v = prefix_kv(encoder, d.layers, d.kv_heads, d.head_dim)
    total, n = 0.0, 0
    for r in rows:
        cache = chat.model.make_cache(64, dtype=torch.float32, device="cpu")
        cache.set_prefix(k, v)
        with torch.no_grad():
            logits = chat.model(torch.tensor([r.input_ids]), cache)[0].double()
        for t in range(len(r.labels) - 1):
            y = r.labels[t + 1]
            if y != -100:
                total += float(torch.logsumexp(logits[t], 0) - logits[t, y])
                n += 1
    return total / n


@pytest.mark.parametrize("family", ["glm", "glm2"])
def test_loss_equals_an_independent_computation_and_only_the_prefix_gets_gradients(
        bases, family) -> None:
    from llmchat.finetune.train import collate, dims_of, new_encoder, prefix_loss
    from llmchat.loader import load

    chat = load(model_path=bases[family], device="cpu", dtype="float32", training=True)
    chat.model.requires_grad_(False)
    d = dims_of(chat.module.__name__, chat.model.config)
    rows = [train_features(Example(q, a, None, 1), chat.tokenizer, d.glm2, source_prefix="",
                           max_source=64, max_target=64)
            for q, a in (("你好", "垃圾"), ("今天天气怎么样 ok", "1"))]
    for projection in (False, True):
        enc = new_encoder(d, 3, projection, seed=1)
        ids, labels = collate(rows, chat.tokenizer.pad_id, torch.device("cpu"))
        assert ids.shape[0] == 2 and (labels == -100).any()  # padded batch of two rows
        loss = prefix_loss(chat.model, d, enc, ids, labels, dtype=torch.float32, dropout=0.0)
        assert float(loss.detach()) == pytest.approx(reference_loss(chat, enc, rows), rel=1e-5)
        loss.backward()
        assert all(p.grad is None and not p.requires_grad for p in chat.model.parameters())
        grads = {n: p.grad for n, p in enc.named_parameters()}
        assert set(grads) == ({"embedding.weight"} | ({"trans.0.weight", "trans.0.bias",
                                                       "trans.2.weight", "trans.2.bias"}
                                                      if projection else set()))
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    # gradient checkpointing changes nothing
    enc = new_encoder(d, 3, False, seed=1)
    plain = prefix_loss(chat.model, d, enc, ids, labels, dtype=torch.float32, dropout=0.0,
                        ckpt=False)
    (g1,) = torch.autograd.grad(plain, enc.embedding.weight)
    again = prefix_loss(chat.model, d, enc, ids, labels, dtype=torch.float32, dropout=0.0)
    (g2,) = torch.autograd.grad(again, enc.embedding.weight)
    assert torch.allclose(g1, g2, atol=1e-6)


# -- training end to end -----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["glm", "glm2"])
def test_trained_prefix_learns_the_answer_and_loads_through_ptuning_checkpoint(
        bases, family, tmp_path, capsys) -> None:
    from llmchat.loader import load
    from llmchat.types import Message

    train = write_jsonl(tmp_path / "train.json", [{"content": "你好", "label": "垃圾"}])
    out = tmp_path / "out"
    rc = main(argv(bases[family], out, train, "--max_steps", "30", "--learning_rate", "3",
                   "--lr_scheduler_type", "constant", "--logging_steps", "5", "--save_steps",
                   "20", "--pre_seq_len", "8", "--json"))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    metrics = json.loads(cap.out)
    assert metrics["step"] == 30
    # checkpoint-20 (save_steps) and the final checkpoint-30
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-30"]
    ck = out / "checkpoint-30"
    sd = torch.load(ck / "pytorch_model.bin", weights_only=True)
    assert list(sd) == ["transformer.prefix_encoder.embedding.weight"]
    assert sd["transformer.prefix_encoder.embedding.weight"].dtype == torch.float32
    cfg = json.loads((ck / "config.json").read_text())
    assert (cfg["pre_seq_len"], cfg["prefix_projection"]) == (8, False)
    state = json.loads((ck / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "loss" in e]
    assert [e["step"] for e in logged] == [5, 10, 15, 20, 25, 30]
    assert state["global_step"] == 30 and all(e["learning_rate"] == 3.0 for e in logged)
    assert logged[-1]["loss"] < 0.75 * logged[0]["loss"]  # the loss falls
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= {p.name for p in ck.iterdir()}

    cfg_gen = ["--temperature", "0", "--max-new-tokens", "8"]
    if family == "glm2":  # the CLI, as a user would run it
        def ask(*extra: str) -> str:
            res = subprocess.run(
                [sys.executable, "-m", "llmchat", "ask", "-p", str(bases[family]), "--device",
                 "cpu", "--dtype", "float32", *cfg_gen, *extra, "你好"],
                capture_output=True, text=True, timeout=120, env=env())
            assert res.returncode == 0, res.stderr
            return res.stdout.strip()
        assert ask("--ptuning-checkpoint", str(ck)) == "垃圾"
    m = load(model_path=bases[family], device="cpu", dtype="float32", ptuning=ck)
    gen = m.defaults.with_(temperature=0, max_new_tokens=8)
    assert m.chat([Message("user", "你好")], gen) == "垃圾"
    m.set_prefix(None)
    assert m.chat([Message("user", "你好")], gen) != "垃圾"  # the prefix made the difference


@pytest.mark.slow
def test_sigint_then_resume_reaches_the_uninterrupted_prefix(bases, tmp_path, capsys) -> None:
    rows = [{"content": f"第{i}条评论 buy now", "label": str(i % 2)} for i in range(5)]
    train = write_jsonl(tmp_path / "train.json", rows)
    common = ["--max_steps", "16", "--gradient_accumulation_steps", "2",
              "--per_device_train_batch_size", "2", "--learning_rate", "0.5",
              "--warmup_steps", "3", "--logging_steps", "1", "--save_steps", "100"]

    def cmd(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "llmchat", "finetune",
                *argv(bases["glm2"], out, train, *common, *extra)]

    assert main(cmd(tmp_path / "full")[4:]) == 0  # the uninterrupted run, in this process
    capsys.readouterr()
    part = tmp_path / "part"
    proc = subprocess.Popen(cmd(part), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env=env())
    assert proc.stderr is not None
    err = []
    for line in proc.stderr:  # interrupt once training is under way
        err.append(line)
        if line.startswith('{"loss"'):
            proc.send_signal(signal.SIGINT)
            break
    err.extend(proc.stderr)
    assert proc.wait(timeout=60) == 130, "".join(err)
    assert "Traceback" not in "".join(err)
    (ck,) = part.glob("checkpoint-*")
    step = int(ck.name.split("-")[1])
    assert 0 < step < 16
    assert f"--resume_from_checkpoint {ck}" in "".join(err)
    res = subprocess.run(cmd(part, "--resume_from_checkpoint", str(ck)), capture_output=True,
                         text=True, timeout=120, env=env())
    assert res.returncode == 0, res.stderr
    a = torch.load(tmp_path / "full/checkpoint-16/pytorch_model.bin", weights_only=True)
    b = torch.load(part / "checkpoint-16/pytorch_model.bin", weights_only=True)
    key = "transformer.prefix_encoder.embedding.weight"
    assert torch.equal(a[key], b[key])
    la = json.loads((tmp_path / "full/trainer_state.json").read_text())["log_history"]
    lb = json.loads((part / "trainer_state.json").read_text())["log_history"]
    assert [e["loss"] for e in la if "loss" in e] == [e["loss"] for e in lb if "loss" in e]


# -- evaluation --------------------------------------------------------------------------------
def test_predict_writes_generated_predictions_and_metrics(bases, tmp_path, capsys) -> None:
    pytest.importorskip("jieba")
    test = write_jsonl(tmp_path / "dev.json", [{"content": "你好", "label": "垃圾"},
                                               {"content": "在吗", "label": "1"}])
    out = tmp_path / "out"
    rc = main(["--do_predict", "--test_file", str(test), "--prompt_column", "content",
               "--response_column", "label", "--model_name_or_path", str(bases["glm2"]),
               "--output_dir", str(out), "--pre_seq_len", "4", "--device", "cpu",
               "--predict_with_generate", "--max_source_length", "16", "--max_target_length",
               "4", "--temperature", "0", "--json"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    m = json.loads(cap.out)
    assert {"predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_bleu-4",
            "predict_accuracy"} <= set(m) and m["predict_samples"] == 2
    lines = [json.loads(x) for x in (out / "generated_predictions.txt").read_text().splitlines()]
    assert [x["labels"] for x in lines] == ["垃圾", "1"]
    assert json.loads((out / "predict_results.json").read_text()) == m


def test_compute_metrics_matches_upstream_formulas() -> None:
    pytest.importorskip("jieba")
    from llmchat.finetune.metrics import compute_metrics

    m = compute_metrics(["1", "0", "垃圾评论"], ["1", "1", "垃圾评论"])
    assert m["accuracy"] == pytest.approx(200 / 3)
    assert m["rouge-1"] == pytest.approx(200 / 3)  # exact matches score 100, "0" vs "1" 0
    assert 0 < m["bleu-4"] <= 100


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("content,needle", [
    ('{"content": "a", "label": "1"}\n{"text": "b", "label": "0"}\n', "line 2: no 'content'"),
    ('{"content": "a", "label": "1"}\n\n{"content": "b", label}\n', "line 3: not valid JSON"),
    ("", "empty file"),
    ('["not an object"]', "line 1: not a JSON object"),
])
def test_bad_data_files_are_one_clear_line(bases, tmp_path, capsys, content, needle) -> None:
    train = tmp_path / "train.json"
    train.write_text(content, encoding="utf-8")
    assert main(argv(bases["glm2"], tmp_path / "o", train)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err, err


def test_output_dir_that_is_a_file_and_existing_checkpoints(bases, tmp_path, capsys) -> None:
    train = write_jsonl(tmp_path / "t.json", [{"content": "a", "label": "1"}])
    f = tmp_path / "file"
    f.write_text("keep me")
    assert main(argv(bases["glm2"], f, train)) == 2
    assert "is a file" in capsys.readouterr().err
    assert f.read_text() == "keep me"
    out = tmp_path / "out"
    (out / "checkpoint-5").mkdir(parents=True)
    (out / "checkpoint-5" / "notes.txt").write_text("mine")
    assert main(argv(bases["glm2"], out, train)) == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert main(argv(bases["glm2"], out, train, "--overwrite_output_dir", "--max_steps", "1")) == 0
    assert (out / "checkpoint-5" / "notes.txt").read_text() == "mine"  # nothing deleted
    assert (out / "checkpoint-1" / "pytorch_model.bin").is_file()


def test_long_labels_warn_once(bases, tmp_path, capsys) -> None:
    rows = [{"content": "a", "label": "很长的回答" * 5}, {"content": "b", "label": "短"},
            {"content": "c", "label": "又一个很长的回答" * 5}]
    train = write_jsonl(tmp_path / "t.json", rows)
    assert main(argv(bases["glm"], tmp_path / "o", train, "--max_target_length", "5",
                     "--max_steps", "1")) == 0
    warns = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert len(warns) == 1 and "line 1 and 1 more" in warns[0] and "3 tokens" in warns[0]


# -- quantized base (--quantization_bit 4|8) ---------------------------------------------------
@pytest.mark.parametrize("family,bits", [("glm", 8), ("glm2", 8), ("glm2", 4)])
def test_prefix_gradients_through_a_quantized_base(bases, family, bits) -> None:
    """Loss and prefix gradients with int8/int4 linears equal those of a float model holding
    the dequantized weights: the backward runs through the quantized layers' inputs."""
    from llmchat.finetune.train import check_backward, collate, dims_of, new_encoder, prefix_loss
    from llmchat.loader import load
    from llmchat.quant import QuantizedLinear

    q = load(model_path=bases[family], device="cpu", dtype="float32", quant=bits, training=True)
    f = load(model_path=bases[family], device="cpu", dtype="float32", training=True)
    for m in (q, f):
        m.model.requires_grad_(False)
    check_backward(q.model)  # no QuantizationError: the backward exists
    qmods = {n: m for n, m in q.model.named_modules() if isinstance(m, QuantizedLinear)}
    assert qmods
    for name, mod in qmods.items():
        f.model.get_submodule(name).weight.copy_(mod.dequantize(torch.float32))
    d = dims_of(q.module.__name__, q.model.config)
    row = train_features(Example("你好", "垃圾", None, 1), q.tokenizer, d.glm2, source_prefix="",
                         max_source=64, max_target=64)
    ids, labels = collate([row], q.tokenizer.pad_id, torch.device("cpu"))
    out = []
    for m in (q, f):
        enc = new_encoder(d, 3, False, seed=1)
        loss = prefix_loss(m.model, d, enc, ids, labels, dtype=torch.float32, dropout=0.0)
        (g,) = torch.autograd.grad(loss, enc.embedding.weight)
        out.append((float(loss.detach()), g))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-4)
    assert torch.allclose(out[0][1], out[1][1], rtol=1e-3, atol=1e-5)
    assert out[0][1].abs().sum() > 0


def test_int4_base_trains_the_answer(bases, tmp_path, capsys) -> None:
    from llmchat.loader import load
    from llmchat.types import Message

    train = write_jsonl(tmp_path / "train.json", [{"content": "你好", "label": "垃圾"}])
    out = tmp_path / "out"
    assert main(argv(bases["glm2"], out, train, "--max_steps", "30", "--learning_rate", "3",
                     "--lr_scheduler_type", "constant", "--logging_steps", "30",
                     "--save_steps", "30", "--pre_seq_len", "8",
                     "--quantization_bit", "4")) == 0, capsys.readouterr().err
    assert "int4" in capsys.readouterr().err
    m = load(model_path=bases["glm2"], device="cpu", dtype="float32", quant=4,
             ptuning=out / "checkpoint-30")
    gen = m.defaults.with_(temperature=0, max_new_tokens=8)
    assert m.chat([Message("user", "你好")], gen) == "垃圾"


def test_missing_metric_libraries_name_the_extra(monkeypatch) -> None:
    from llmchat.errors import LLMChatError
    from llmchat.finetune.metrics import compute_metrics

    monkeypatch.setitem(sys.modules, "rouge_chinese", None)  # as if not installed
    with pytest.raises(LLMChatError, match=r"rouge_chinese: pip install 'llmchat\[finetune\]'"):
        compute_metrics(["1"], ["1"])
