"""LoRA (peft) and QLoRA: the adapted policy starts at its reference, trains and resumes its
adapters only, checkpoints activations without changing gradients, and registers merged."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from dpoflow.config import load_config
from dpoflow.errors import ConfigError
from dpoflow.models import lora
from dpoflow.models.logprobs import pair_batch, sequence_logps, split_pair_logps
from dpoflow.models.losses import preference_loss
from dpoflow.models.trainer import dpo_examples, read_pairs
from tests.conftest import PROJECT_ROOT, copy_stages, run_cli, run_pipeline, worker_fixture
from tests.test_training import (  # noqa: F401  (embedded: a fixture)
    LOSS_TOLERANCE,
    embedded,
    losses,
    make_job,
    train,
)

LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear"}


def tiny(embedded_fixture):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_fixture["model"]
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def pair_inputs(embedded_fixture, tokenizer, n: int = 8) -> dict[str, torch.Tensor]:  # noqa: F811
    cfg = {"max_length": 64, "max_prompt_length": 16}
    examples = dpo_examples(read_pairs(embedded_fixture["data"])[:n], tokenizer, cfg)
    return pair_batch([e[:3] for e in examples], tokenizer.eos_token_id)


def test_a_lora_policy_starts_with_a_log_ratio_of_exactly_zero(embedded):  # noqa: F811
    base, tokenizer = tiny(embedded)
    batch = pair_inputs(embedded, tokenizer)
    with torch.no_grad():
        reference = split_pair_logps(sequence_logps(base, batch)["logps"])
    linear = {  # before wrapping: peft replaces these modules in place
        n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    }
    policy = lora.prepare(base, LORA)
    policy.train()  # as in training: dropout and all
    chosen, rejected = split_pair_logps(sequence_logps(policy, batch)["logps"])
    assert torch.equal(chosen, reference[0]) and torch.equal(rejected, reference[1])
    _, chosen_rewards, rejected_rewards = preference_loss(
        chosen, rejected, *reference, beta=0.1, loss_type="sigmoid"
    )
    assert torch.equal(chosen_rewards, torch.zeros_like(chosen_rewards))
    assert torch.equal(rejected_rewards, torch.zeros_like(rejected_rewards))
    # Only the adapters train, on every linear layer but the output head.
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".lora_")[0].removeprefix("base_model.model.") for n in trainable}
    assert adapted == linear


def gradients(embedded_fixture, adapters, checkpointing: bool) -> dict[str, torch.Tensor]:  # noqa: F811
    torch.manual_seed(0)
    model, tokenizer = tiny(embedded_fixture)
    model = lora.prepare(model, adapters, gradient_checkpointing=checkpointing)
    assert model.is_activation_checkpointing == checkpointing  # the option really took effect
    if adapters:  # B starts at zero, where A gets no gradient: step away from it first
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    model.train()
    out = sequence_logps(model, pair_inputs(embedded_fixture, tokenizer))
    (-out["logps"].sum() / out["n_tokens"].sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("adapters", [None, LORA], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_gradients(embedded, adapters):  # noqa: F811
    plain = gradients(embedded, adapters, checkpointing=False)
    recomputed = gradients(embedded, adapters, checkpointing=True)
    assert plain.keys() == recomputed.keys() and plain
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name  # every trained tensor gets a gradient
        torch.testing.assert_close(recomputed[name], grad, rtol=0, atol=0, msg=name)


def saved_activation_bytes(embedded_fixture, adapters, checkpointing: bool) -> int:  # noqa: F811
    """Bytes autograd keeps from one training forward pass for the backward pass."""
    model, tokenizer = tiny(embedded_fixture)
    model = lora.prepare(model, adapters, gradient_checkpointing=checkpointing)
    model.train()
    saved: list[int] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        sequence_logps(model, pair_inputs(embedded_fixture, tokenizer))
    return sum(saved)


@pytest.mark.parametrize("adapters", [None, LORA], ids=["full", "lora"])
def test_gradient_checkpointing_keeps_fewer_activations(embedded, adapters):  # noqa: F811
    plain = saved_activation_bytes(embedded, adapters, checkpointing=False)
    recomputed = saved_activation_bytes(embedded, adapters, checkpointing=True)
    print(f"\nsaved for the backward: {plain / 2**20:.2f} MB plain, {recomputed / 2**20:.2f} MB")
    assert recomputed < plain / 2


def test_the_policy_trains_in_train_mode(embedded, tmp_path):  # noqa: F811
    """`from_pretrained` hands a model over in eval mode, where dropout and activation
    checkpointing do nothing; the loop trains in train mode. Seen: with attention dropout in
    its config, the first step is no longer exactly at its (dropout-free) reference."""
    model = tmp_path / "with-dropout"
    shutil.copytree(embedded["model"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"attention_dropout": 0.5}))
    job = make_job(dict(embedded, model=str(model)), tmp_path, max_steps=1, learning_rate=1e-6)
    _, rows = train(job, tmp_path)
    assert abs(rows[0]["loss"] - math.log(2)) > 1e-3  # eval mode: log 2 to 1e-6


def test_a_qlora_policy_starts_exactly_at_its_reference_the_nf4_base(embedded):  # noqa: F811
    """QLoRA's reference is the quantized base its policy starts from (bitsandbytes' CPU
    kernels here; runs refuse 4-bit without CUDA), not the base in full precision."""
    from dpoflow.models.reference import load_reference_model

    reference, tokenizer, _ = load_reference_model(embedded["model"], "fp32", "cpu", None, True)
    unquantized, _, _ = load_reference_model(embedded["model"], "fp32", "cpu")
    batch = pair_inputs(embedded, tokenizer)
    with torch.no_grad():
        expected = sequence_logps(reference, batch)["logps"]
        full_precision = sequence_logps(unquantized, batch)["logps"]
    base = lora.load_base_model(embedded["model"], revision=None, load_in_4bit=True)
    policy = lora.prepare(base, LORA, load_in_4bit=True)
    # In eval mode, as the reference ran: bitsandbytes' CPU backend has a kernel for inference
    # and another (dequantize, then matmul) for training, both in bf16, rounding differently.
    policy.eval()
    with torch.no_grad():
        start = sequence_logps(policy, batch)["logps"]
    assert torch.equal(start, expected)
    assert (expected - full_precision).abs().max() > 0.1  # the 4-bit base is another model


def test_merging_in_place_saves_what_merging_into_the_stored_base_saves(embedded, tmp_path):  # noqa: F811
    """The trainer merges a fp32 policy's adapters into its own base weights (no second copy of
    the base in memory); ZeRO-3 and QLoRA merge into the stored base: both give the same model."""
    from safetensors.torch import load_file

    base, _ = tiny(embedded)
    policy = lora.prepare(base, LORA)
    with torch.no_grad():  # trained adapters: B is no longer zero, so the merge changes weights
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    lora.save_merged(policy, tmp_path / "model", base_path=embedded["model"], revision=None)
    stored = lora.merge_adapter(tmp_path / lora.ADAPTER_DIR, embedded["model"], tmp_path / "ref")
    in_place = load_file(tmp_path / "model" / "model.safetensors")
    from_stored = load_file(stored / "model.safetensors")
    original = load_file(f"{embedded['model']}/model.safetensors")
    assert in_place.keys() == from_stored.keys()
    assert all(torch.equal(in_place[k], from_stored[k]) for k in in_place)
    assert any(not torch.equal(in_place[k], original[k]) for k in in_place)  # it did merge


def test_the_lora_recipe_is_a_valid_config_with_adapters():
    cfg = load_config(PROJECT_ROOT / "configs" / "lora-smollm2.yaml")
    assert cfg.model.lora is not None and cfg.model.lora.r == 16
    assert cfg.model.lora.target_modules == "all-linear" and not cfg.model.load_in_4bit


QLORA = ["--set", "model.lora.r=8", "--set", "model.load_in_4bit=true"]


def test_4bit_is_refused_without_cuda_by_run_and_sweep_before_anything_runs(cli_env, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: 4-bit loading is allowed here")
    for command in (["run"], ["sweep", "--betas", "0.1,0.2"]):
        work = tmp_path / command[0]
        proc = run_cli([*command, "--workdir", str(work), *QLORA], cli_env)
        assert proc.returncode == 1, proc.stderr
        assert (
            "needs a CUDA GPU" in proc.stderr and "set model.load_in_4bit to false" in proc.stderr
        )
        assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1  # one sentence
        assert not work.exists()  # no Prefect server, no embedded model: nothing was started


def test_a_4bit_config_is_read_on_a_machine_that_does_not_train(cli_env, tmp_path):
    """The config that trains with QLoRA on a GPU machine is the one a CPU machine serves and
    lists models with: only `run` and `sweep` need CUDA for it."""
    cfg = load_config(overrides=["model.lora.r=8", "model.load_in_4bit=true"])
    assert cfg.model.load_in_4bit and cfg.model.lora.r == 8
    proc = run_cli(["models", "--workdir", str(tmp_path), *QLORA], cli_env)
    assert proc.returncode == 0, proc.stderr
    assert "no registered models" in proc.stdout
    with pytest.raises(ConfigError, match="add a model.lora section"):
        load_config(overrides=["model.load_in_4bit=true"])


ADAPTERS = {"lora": LORA, "load_in_4bit": False}


def lora_job(embedded_fixture, out: Path, **distributed) -> dict:
    return make_job(embedded_fixture, out, learning_rate=1e-2, **distributed) | {
        "adapters": ADAPTERS
    }


@worker_fixture
def one_process_lora(embedded, tmp_path_factory):  # noqa: F811
    """A one-process LoRA DPO job, checkpointed every 4 of its 8 steps: (result, metric rows,
    its folder). Tests that change the folder work on a copy."""
    out = tmp_path_factory.mktemp("one-lora")
    return *train(lora_job(embedded, out), out), out


@pytest.mark.slow
def test_adapter_checkpoints_hold_only_what_trains_and_resume(
    embedded,  # noqa: F811
    one_process_lora,
    tmp_path,
):
    first, first_rows, done = one_process_lora
    # The checkpoint of step 4 (the last one before the end) holds the adapters, not the base.
    states = torch.load(
        done / "checkpoints" / "step4" / "mp_rank_00_model_states.pt", weights_only=False
    )
    saved = set(states["module"])
    assert saved and all("lora_" in name for name in saved), sorted(saved)[:5]
    # A stage's output: the merged model (loads without peft) and the adapter beside it.
    assert (done / "model" / "model.safetensors").is_file()
    assert json.loads((done / "adapter" / "adapter_config.json").read_text())["r"] == 4

    # Again from the step-4 checkpoint: the same curve from there on.
    out = tmp_path / "run"
    shutil.copytree(done, out, ignore=shutil.ignore_patterns("model", "adapter"))
    resumed, resumed_rows = train(lora_job(embedded, out), out)
    assert resumed["resumed_from_step"] == 4 and first["resumed_from_step"] == 0
    assert losses(first_rows)[-1] == pytest.approx(losses(resumed_rows)[-1], abs=1e-5)
    assert losses(first_rows)[-1] < losses(first_rows)[0]  # the adapters learn


@pytest.mark.slow
def test_adapters_under_zero3_on_two_processes_follow_one_process(
    embedded,  # noqa: F811
    one_process_lora,
    tmp_path,
):
    """ZeRO-3 partitions the base and the adapters over the ranks and hands its model on by
    another road (the adapters from the consolidated state dict, merged into the stored base):
    the same curve as one process, and the same merged weights."""
    from safetensors.torch import load_file

    _, one_rows, one = one_process_lora
    two, two_rows = train(lora_job(embedded, tmp_path, processes=2, zero=3), tmp_path)
    assert two["world_size"] == 2
    diff = max(abs(a - b) for a, b in zip(losses(two_rows), losses(one_rows), strict=True))
    assert diff < LOSS_TOLERANCE  # the gradient all-reduce's float reassociation

    merged = {
        name: load_file(out / "model" / "model.safetensors")
        for name, out in [("one", one), ("zero3", tmp_path)]
    }
    base = load_file(f"{embedded['model']}/model.safetensors")
    assert merged["one"].keys() == merged["zero3"].keys()
    moved = 0
    for key, weight in merged["one"].items():
        delta_one, delta_two = weight - base[key], merged["zero3"][key] - base[key]
        if not delta_one.any():  # not adapted (embeddings, norms, head): the base, bit for bit
            assert torch.equal(merged["zero3"][key], base[key]), key
            continue
        moved += 1
        # Adam's normalised steps carry the all-reduce's rounding into the weights a little:
        # the two merged updates agree to 1% of their size (a missing or mis-scaled merge: 100%).
        assert (delta_two - delta_one).norm() <= 0.01 * delta_one.norm(), key
    assert moved > 0  # the adapters were merged in, not the base handed on


@pytest.mark.slow
def test_lora_through_the_pipeline_registers_a_model_that_generates(
    shared_stages, tmp_path, cli_env
):
    import mlflow
    import pandas as pd

    workdir = copy_stages(shared_stages, tmp_path)
    settings = ("model.lora={r: 4, alpha: 8}", "sft.max_steps=6", "dpo.max_steps=4")
    proc, _ = run_pipeline(workdir, cli_env, *settings)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("sft", "dpo"):  # both trained adapters, merged after (beside the shared full SFT)
        manifests = (workdir / "stages" / name).glob("*/manifest.json")
        assert any(json.loads(m.read_text()).get("adapter") == "adapter" for m in manifests), name
    # The same policy registered unmerged: only register and promote run again.
    proc, _ = run_pipeline(workdir, cli_env, *settings, "registry.merge_adapters=false")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # set_tracking_uri sets $MLFLOW_TRACKING_URI too: unset after, or the next tests of this
    # worker that resolve the default store would find this one.
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    try:
        versions = mlflow.MlflowClient().search_model_versions("name='dpoflow-policy'")
        weights = {str(v.version): v.tags["weights"] for v in versions}
        assert weights == {"1": "full", "2": "lora_adapter"}
        adapter_version = next(v for v in versions if str(v.version) == "2")
        assert adapter_version.tags["adapter_base_run_id"] == adapter_version.tags["sft_run_id"]
        request = pd.DataFrame(
            {"prompt": ["This movie was", "I expected"], "max_new_tokens": [8, 8], "temperature": 0}
        )
        answers = [
            mlflow.pyfunc.load_model(f"models:/dpoflow-policy/{v}")
            .predict(request)["text"]
            .tolist()
            for v in ("1", "2")
        ]
    finally:
        mlflow.set_tracking_uri(None)
    # Text from both (a greedy answer may be eos at once), the same policy either way.
    assert any(answers[0]) and answers[0] == answers[1]
