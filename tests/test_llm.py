"""The public face: `from distspec import LLM, SamplingParams, EdgeClient`; LLM batches
prompts through the scheduler and gives the target's greedy output; the README's example runs
as written (demo model, slow)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from distspec.models.tokenizer import ChatMessage
from test_decoding import PROMPTS, encode, greedy_ar

README = Path(__file__).resolve().parents[1] / "README.md"


def test_import_distspec_is_light_and_names_the_face():
    code = (
        "import sys, distspec; assert 'ray' not in sys.modules and 'torch' not in sys.modules; "
        "from distspec import LLM, SamplingParams, EdgeClient; print(sorted(distspec.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "LLM" in out.stdout and "EdgeClient" in out.stdout
    with pytest.raises(AttributeError):
        import distspec

        distspec.Nothing  # noqa: B018


@pytest.mark.parametrize("mode", ["sd", "pearl", "ar"])
def test_llm_batches_prompts_and_gives_greedy_output(tiny_dir, tiny_drafter_dir, target, mode):
    from distspec import LLM, SamplingParams

    with LLM(str(tiny_dir), str(tiny_drafter_dir), mode=mode, num_slots=2, max_len=288) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=24))  # 4 prompts, 2 slots
        assert [o.token_ids for o in outs] == [
            greedy_ar(target, encode(target, p), 24) for p in PROMPTS
        ]
        assert [o.prompt_token_ids for o in outs] == [encode(target, p) for p in PROMPTS]
        assert all(o.finish_reason == "length" and o.stats.new_tokens == 24 for o in outs)
        assert outs[0].text == llm.tokenizer.decode(outs[0].token_ids)
        seeded = [SamplingParams(max_new_tokens=12, temperature=1.0, seed=s) for s in (1, 1, 2)]
        a, b, c = llm.generate(["Hello"] * 3, seeded)
        assert a.token_ids == b.token_ids != c.token_ids
        with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
            llm.generate("Hello", seeded[:2])


def test_llm_chat_applies_the_template(tiny_dir, target):
    from distspec import LLM, SamplingParams

    with LLM(str(tiny_dir), drafter=None, num_slots=1, max_len=288) as llm:
        conversation = [{"role": "user", "content": "Hi"}]
        (out,) = llm.chat(conversation, SamplingParams(max_new_tokens=8))
        assert out.prompt_token_ids == llm.tokenizer.encode_chat([ChatMessage("user", "Hi")])
        assert out.prompt_token_ids != encode(target, "Hi")
        assert out.token_ids == greedy_ar(target, out.prompt_token_ids, 8)


@pytest.mark.slow
def test_readme_example_runs_as_written(tmp_path):
    text = README.read_text()
    section = text[text.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3 and "Paris" in lines[0], out.stdout
