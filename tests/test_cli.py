"""The command line: one-line errors, the --json contract, greedy exactness on the demo model."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distspec.cli import build_parser, main
from distspec.models.loader import load_for_inference, load_model
from distspec.spec_decode.decoding import SpeculativeDecoder
from distspec.spec_decode.sampling import SamplingParams
from tiny import make_tiny_model_dir

LONG_PROMPT = "x" * 40
STATS_KEYS = {
    "new_tokens",
    "wall_s",
    "tokens_per_s",
    "target_forwards",
    "tokens_per_target_forward",
    "draft_tokens",
    "accepted_tokens",
    "acceptance_rate",
}


@pytest.fixture(scope="module")
def other_vocab_dir(tmp_path_factory) -> Path:
    """A tiny model with the same byte tokenizer but a 300-token vocabulary in its config."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("vocab300") / "m", vocab_size=300)


def assert_one_line_error(rc: int, err: str) -> str:
    assert rc != 0
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, repr(err)
    assert err.startswith("distspec: error: "), repr(err)
    return err


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """generate with args (the default drafter, a copy of the target, fits any target)."""
    rc = main(["generate", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def run_cli_args(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--prompt", ""], "prompt is empty"),
        (["--prompt", "   \n "], "prompt is empty"),
        (["--prompt", "hi", "--temperature", "-0.5"], "temperature"),
        (["--prompt", "hi", "--temperature", "nan"], "temperature"),
        (["--prompt", "hi", "--top-p", "0"], "top_p"),
        (["--prompt", "hi", "--top-p", "1.5"], "top_p"),
        (["--prompt", "hi", "--top-k", "-2"], "top_k"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
        (["--prompt", "hi", "--gamma", "0"], "gamma"),
        (["--prompt", "hi", "--drafter", "demo"], "vocabulary"),  # the demo drafter, tiny target
        (["--prompt", "hi", "--drafter", "/no/such/drafter"], "not found"),
        (["--prompt", LONG_PROMPT, "--raw", "--max-len", "16"], "context"),
        (["--prompt", LONG_PROMPT, "--raw", "--max-len", "16", "--mode", "ar"], "context"),
    ],
)
def test_bad_input_is_one_line_error(capsys, tiny_dir, args, fragment):
    rc, out, err = run_cli(capsys, "--target", str(tiny_dir), *args)
    assert_one_line_error(rc, err)
    assert fragment in err
    assert out == ""


def test_unknown_model_path(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "--target", str(tmp_path / "missing"), "--prompt", "hi")
    assert_one_line_error(rc, err)
    assert "not found" in err
    # an existing directory that is not a model
    rc, _, err = run_cli(capsys, "--target", str(tmp_path), "--prompt", "hi")
    assert_one_line_error(rc, err)
    assert "not a model" in err


def test_drafter_with_other_vocabulary_is_rejected(capsys, tiny_dir, other_vocab_dir):
    rc, out, err = run_cli(
        capsys, "--target", str(tiny_dir), "--drafter", str(other_vocab_dir), "--prompt", "hi"
    )
    assert_one_line_error(rc, err)
    assert "vocabulary" in err and "300" in err
    assert out == ""


def test_ar_mode_ignores_the_drafter(capsys, tiny_dir, other_vocab_dir):
    rc, out, _ = run_cli(
        capsys,
        *("--target", str(tiny_dir), "--drafter", str(other_vocab_dir), "--mode", "ar"),
        *("--prompt", "hi", "--max-new-tokens", "3", "--json"),
    )
    assert rc == 0
    assert json.loads(out)["drafter"] is None


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "hi", "--temperature", "abc"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("distspec") and "error:" in err
    assert "--temperature" in err and "usage" not in err
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("distspec: error:")


def _subprocess(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def test_subprocess_console_script_error(tiny_dir):
    script = Path(sys.executable).parent / "distspec"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "distspec"]
    proc = _subprocess(
        *cmd, "generate", "--target", str(tiny_dir), "--prompt", "hi", "--top-p", "0"
    )
    assert_one_line_error(proc.returncode, proc.stderr)
    assert proc.returncode == 1
    assert "top_p" in proc.stderr
    assert proc.stdout == ""


def test_subprocess_module_error_after_loading(tiny_dir, other_vocab_dir):
    proc = _subprocess(
        *(sys.executable, "-m", "distspec", "generate", "--target", str(tiny_dir)),
        *("--drafter", str(other_vocab_dir), "--prompt", "hello"),
    )
    assert_one_line_error(proc.returncode, proc.stderr)
    assert "vocabulary" in proc.stderr
    assert proc.stdout == ""


# ---------------------------------------------------------------------------------------------
# output


AUTO = ("sd", "pearl")  # what --mode auto may choose


@pytest.mark.parametrize(
    "mode_args",
    [
        ["--mode", "ar"],
        ["--mode", "sd", "--drafter", "ngram"],
        ["--mode", "sd", "--gamma", "3"],
        ["--mode", "pearl", "--gamma", "3"],
        ["--mode", "auto", "--gamma", "3"],
    ],
)
def test_json_contract(capsys, tiny_dir, tiny_drafter_dir, mode_args):
    if mode_args[-1] == "3":
        mode_args = [*mode_args, "--drafter", str(tiny_drafter_dir)]
    rc, out, err = run_cli(
        capsys,
        *("--target", str(tiny_dir), "--prompt", "abcabcabc", "--raw", "--json"),
        *("--max-new-tokens", "12", *mode_args),
    )
    assert rc == 0, err
    assert out.count("\n") == 1  # exactly one JSON object, nothing streamed before it
    result = json.loads(out)
    assert {"text", "token_ids", "finish_reason", "stats"} <= set(result)
    # the mode decoding ran in: auto's choice
    assert result["mode"] == mode_args[1] or (mode_args[1] == "auto" and result["mode"] in AUTO)
    stats = result["stats"]
    assert set(stats) >= STATS_KEYS
    assert len(result["token_ids"]) == stats["new_tokens"]
    assert 1 <= stats["new_tokens"] <= 12
    assert result["finish_reason"] in ("stop", "length")
    if result["finish_reason"] == "length":
        assert stats["new_tokens"] == 12
    assert isinstance(result["text"], str)
    assert all(isinstance(t, int) for t in result["token_ids"])
    assert stats["tokens_per_target_forward"] == pytest.approx(
        stats["new_tokens"] / stats["target_forwards"]
    )
    assert 0.0 <= stats["acceptance_rate"] <= 1.0
    assert stats["accepted_tokens"] <= stats["draft_tokens"]
    if mode_args[1] == "ar":
        assert result["drafter"] is None
        assert stats["draft_tokens"] == 0
        assert stats["tokens_per_target_forward"] == 1.0
    # greedy: the same tokens as the decoder run directly on the same model
    loaded = load_model(str(tiny_dir), max_len=4096)
    dec = SpeculativeDecoder(loaded.model, None, eos_token_ids=loaded.tokenizer.eos_token_ids)
    ids = loaded.tokenizer.encode("abcabcabc")
    assert stats["prompt_tokens"] == len(ids)
    expected, _ = dec.generate(ids, SamplingParams(max_new_tokens=12))
    assert result["token_ids"] == expected
    assert result["text"] == loaded.tokenizer.decode(expected)


def test_an_int4_target_with_int8_activations_decodes_as_loaded(capsys, tiny_dir):
    """--target-dtype int4 with either --target-activations: the tokens of that model
    decoded directly."""
    for acts in ("fp32", "int8"):
        rc, out, err = run_cli(
            capsys,
            *("--target", str(tiny_dir), "--prompt", "abcabcabc", "--raw", "--json"),
            *("--max-new-tokens", "24", "--mode", "ar", "--target-dtype", "int4"),
            *("--target-activations", acts),
        )
        assert rc == 0, err
        loaded = load_for_inference(
            str(tiny_dir), max_len=256, weight_dtype="int4", quant_activations=acts
        )
        dec = SpeculativeDecoder(loaded.model, None, eos_token_ids=loaded.tokenizer.eos_token_ids)
        ids = loaded.tokenizer.encode("abcabcabc")
        want = dec.generate(ids, SamplingParams(max_new_tokens=24))[0]
        assert json.loads(out)["token_ids"] == want


def test_plain_output_streams_text(capsys, tiny_dir):
    rc, out, _ = run_cli(
        capsys,
        *("--target", str(tiny_dir), "--prompt", "Hi there", "--max-new-tokens", "8"),
        *("--temperature", "0.8", "--seed", "3"),
    )
    assert rc == 0
    assert out.endswith("\n")
    rc2, out2, _ = run_cli(
        capsys,
        *("--target", str(tiny_dir), "--prompt", "Hi there", "--max-new-tokens", "8"),
        *("--temperature", "0.8", "--seed", "3", "--json"),
    )
    assert rc2 == 0
    assert out == json.loads(out2)["text"] + "\n"  # same seed, same text


@pytest.mark.parametrize("mode", ["sd", "ar"])
def test_plain_output_ends_with_a_summary_on_stderr(capsys, tiny_dir, mode):
    rc, _, err = run_cli(
        capsys,
        *("--target", str(tiny_dir), "--prompt", "abcabcabc", "--max-new-tokens", "12"),
        *("--mode", mode),
    )
    assert rc == 0 and err.count("\n") == 1
    assert re.fullmatch(r"12 tokens in [\d.]+ s, [\d.]+ tokens/s; mode \w+.*\n", err), err
    if mode == "sd":
        assert re.search(r"drafter self: tau [\d.]+ tokens per target forward, \d+% of \d+ ", err)
    else:
        assert "drafter" not in err


# ---------------------------------------------------------------------------------------------
# the demo model against transformers (slow)

DEMO_MAX_NEW = 48
RAW_PROMPT = "The three primary colors are"
CHAT_PROMPT = "What is the capital of France? Answer in one sentence."


def _hf_greedy(demo_hf, chat: bool, prompt: str) -> tuple[list[int], list[int]]:
    model, tok = demo_hf
    if chat:
        enc = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True
        )
        ids = list(enc["input_ids"])
    else:
        ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=DEMO_MAX_NEW,
            do_sample=False,
        )
    return ids, out[0, len(ids) :].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True], ids=["raw", "chat"])
def test_demo_greedy_matches_transformers(capsys, demo_hf, chat):
    ids, ref = _hf_greedy(demo_hf, chat, CHAT_PROMPT if chat else RAW_PROMPT)
    eos = demo_hf[1].eos_token_id
    if chat:
        assert ref[-1] == eos and len(ref) < DEMO_MAX_NEW  # exercises stopping on EOS
    for mode in (["--mode", "ar"], ["--mode", "sd", "--drafter", "ngram", "--gamma", "4"]):
        args = ["--target", "demo", "--prompt", CHAT_PROMPT if chat else RAW_PROMPT]
        args += ["--max-new-tokens", str(DEMO_MAX_NEW), "--json", *mode]
        if not chat:
            args.append("--raw")
        rc, out, err = run_cli(capsys, *args)
        assert rc == 0, err
        result = json.loads(out)
        assert result["stats"]["prompt_tokens"] == len(ids)
        assert result["token_ids"] == ref, mode
        stopped = len(ref) < DEMO_MAX_NEW
        assert result["finish_reason"] == ("stop" if stopped else "length")
        if mode[1] == "sd":
            assert result["stats"]["draft_tokens"] > 0


# ---------------------------------------------------------------------------------------------
# serve


@pytest.mark.parametrize(
    "yaml_text, fragment",
    [
        ("num_slotz: 3\n", "unknown setting(s) num_slotz"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("target_activations: int4\n", "target activations must be one of fp32, int8"),
    ],
)
def test_serve_config_errors_are_one_line(capsys, tmp_path, yaml_text, fragment):
    config = tmp_path / "serve.yaml"
    config.write_text(yaml_text)
    rc, _, err = run_cli_args(capsys, "serve", "--config", str(config))
    assert fragment in assert_one_line_error(rc, err)


def test_serve_from_yaml_answers_and_stops_on_sigterm(tmp_path, tiny_dir, tiny_drafter_dir):
    import re
    import signal

    import grpc

    from distspec.v1 import speculative_decoding_pb2 as pb
    from distspec.v1 import speculative_decoding_pb2_grpc as pb_grpc

    config = tmp_path / "serve.yaml"
    config.write_text(
        f"target: {tiny_dir}\ndrafter: {tiny_drafter_dir}\nnum_slots: 2\nmax_len: 288\n"
        "use_ray: false\nport: 0\nhost: 127.0.0.1\n"
    )
    args = [sys.executable, "-m", "distspec", "serve", "--config", str(config), "--mode", "sd"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"serving .* \(sd\) on 127.0.0.1:(\d+)$", line.strip())
        assert match, line + proc.stderr.read()
        with grpc.insecure_channel(f"127.0.0.1:{match.group(1)}") as channel:
            stub = pb_grpc.SpeculativeDecodingStub(channel)
            request = pb.GenerateRequest(prompt="abcabc", max_new_tokens=8)
            responses = list(stub.Generate(request, timeout=60))
        assert sum(len(r.token_ids) for r in responses) == 8
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


# ---------------------------------------------------------------------------------------------
# help


def parser_actions(parser: argparse.ArgumentParser, path: str = "distspec"):
    """(command, action) for every action of parser and of its commands, -h/--help excepted."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        yield path, action
        if isinstance(action, argparse._SubParsersAction):
            for command in action._choices_actions:  # the commands' lines in `distspec -h`
                yield path, command
            for name, sub in action.choices.items():
                yield from parser_actions(sub, f"{path} {name}")


def test_every_flag_and_command_has_help():
    actions = list(parser_actions(build_parser()))
    assert len({path for path, _ in actions}) == 12  # distspec and its eleven commands
    missing = [
        f"{path}: {'/'.join(a.option_strings) or a.dest}"
        for path, a in actions
        if not (a.help or "").strip()
    ]
    assert not missing, "no help text: " + ", ".join(missing)
