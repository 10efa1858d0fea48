"""CSM training on shards: the model inputs and labels, the loop, checkpoints and resume, torchrun, the flow."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from training.checkpoint import CHECKPOINT_VERSION, latest_checkpoint, list_checkpoints, load_checkpoint
from training.config import TrainConfig
from training.data import AUDIO, EOS, Loader, OutOfData, load_manifest
from training.model import CsmForTraining, build_model, decoder_labels
from training.synthetic import write_synthetic_dataset
from training.train import frame_generator, run

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 51866
# Small, fast runs: tiny model, 2-sequence micro-batches, a log line every step, no export unless asked.
FAST = dict(model_size="tiny", batch_size=2, grad_accum=2, num_workers=0, shuffle_buffer=8, bucket_batches=2,
            lr=3e-3, warmup_steps=1, log_interval=1, eval_interval=1000, eval_fraction=0.2, eval_batches=2,
            export_final=False, tensorboard=False)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # 2 shared cores: intra-op threads only fight each other and the DataLoader workers
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    return str(write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), recordings=8, windows_per_recording=3))


@pytest.fixture(scope="module")
def batch(manifest: str) -> dict:
    cfg = TrainConfig(**FAST)
    return Loader(load_manifest(manifest), cfg, rank=0, world_size=1, text_vocab_size=VOCAB).next()


def test_loss_goes_down_on_a_repeated_batch(batch: dict) -> None:
    torch.manual_seed(0)
    model = build_model(TrainConfig(**FAST))
    tm = CsmForTraining(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    labels, _ = decoder_labels(batch["codes"], batch["kinds"], 1 / 16, torch.Generator().manual_seed(0))
    history = []
    for _ in range(30):
        loss, backbone, decoder = tm(batch["text"], batch["codes"], batch["kinds"], batch["attention_mask"], labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        history.append((loss.item(), backbone.item(), decoder.item()))
    (l0, b0, d0), (l1, b1, d1) = history[0], history[-1]
    assert l1 < 0.7 * l0, history
    assert b1 < b0 - 1 and d1 < d0 - 1, history


def test_depth_decoder_trains_on_sampled_frames_only(batch: dict) -> None:
    torch.manual_seed(0)
    model = build_model(TrainConfig(**FAST))
    tm = CsmForTraining(model)
    codes, kinds = batch["codes"], batch["kinds"]
    labels, n_dec = decoder_labels(codes, kinds, 1 / 16, torch.Generator().manual_seed(1))
    n_audio, n_eos = int((kinds == AUDIO).sum()), int((kinds == EOS).sum())
    assert n_dec == -(-n_audio // 16) + n_eos  # ceil(1/16 of the audio frames), plus every end-of-audio frame

    seen: dict = {}
    model.depth_decoder.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(frames=kwargs["input_ids"].shape[0], labels=kwargs["labels"]),
        with_kwargs=True,
    )
    model.backbone_model.register_forward_hook(lambda m, args, out: seen.update(hidden=out.last_hidden_state))
    _, backbone_loss, decoder_loss = tm(batch["text"], codes, kinds, batch["attention_mask"], labels)
    assert seen["frames"] == n_dec
    keep = (labels[..., 1:] != -100).any(-1)
    assert torch.equal(seen["labels"], codes[keep].long())  # exactly the sampled frames' codes, in order

    # gradients reach the backbone's last hidden states at t-1 for the frames t that each loss trains on
    hidden = seen["hidden"]
    g_dec = torch.autograd.grad(decoder_loss, hidden, retain_graph=True)[0].abs().sum(-1) != 0
    g_bb = torch.autograd.grad(backbone_loss, hidden)[0].abs().sum(-1) != 0

    def shifted(mask: torch.Tensor) -> torch.Tensor:  # position t -> row t-1
        return torch.nn.functional.pad(mask[:, 1:], (0, 1))

    assert torch.equal(g_dec, shifted(keep))
    labelled = (kinds == AUDIO) | (kinds == EOS)
    assert torch.equal(g_bb, shifted(labelled))  # every audio and end-of-audio frame
    assert int(g_bb.sum()) == n_audio + n_eos > 8 * int(g_dec.sum()) // 2


def test_full_decoder_ratio_trains_every_frame(batch: dict) -> None:
    labels, n_dec = decoder_labels(batch["codes"], batch["kinds"], 1.0, torch.Generator().manual_seed(0))
    assert n_dec == int((batch["kinds"] >= AUDIO).sum())
    assert ((labels[..., 1:] != -100).any(-1) == (batch["kinds"] >= AUDIO)).all()


def test_resume_continues_with_identical_losses(manifest: str, tmp_path: Path) -> None:
    base = {**FAST, "num_workers": 2, "max_steps": 4, "checkpoint_interval": 2}
    a = run(manifest, TrainConfig(**base, out_dir=str(tmp_path / "a")))
    assert a.step == 4 and a.stopped == "max_steps"
    assert [p.name for p in list_checkpoints(tmp_path / "a" / "checkpoints")] == ["step-00000002.pt", "step-00000004.pt"]
    state = load_checkpoint(tmp_path / "a" / "checkpoints" / "step-00000002.pt")
    assert state["version"] == CHECKPOINT_VERSION and state["step"] == 2 and state["world_size"] == 1
    assert {"model", "optimizer", "scheduler", "config", "loader", "rng"} <= state.keys()
    assert len(state["loader"]) == 1 and sum(state["loader"][0]["consumed"]) == 4  # 2 steps x 2 micro-batches

    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "checkpoints" / "step-00000002.pt", tmp_path / "b" / "checkpoints")
    b = run(manifest, TrainConfig(**base, out_dir=str(tmp_path / "b")))
    assert [h["step"] for h in b.history] == [3, 4]
    assert [h["loss"] for h in b.history] == [h["loss"] for h in a.history[2:]]  # bit-identical

    with pytest.raises(ValueError, match="data-order"):
        run(manifest, TrainConfig(**{**base, "batch_size": 3}, out_dir=str(tmp_path / "b")))


def test_running_out_of_data(manifest: str, tmp_path: Path) -> None:
    r = run(manifest, TrainConfig(**{**FAST, "epochs": 1, "eval_interval": 2}, out_dir=str(tmp_path / "r")))
    assert r.stopped == "out_of_data" and r.step >= 3
    assert r.eval_loss is not None and latest_checkpoint(tmp_path / "r" / "checkpoints") is not None
    # resuming a finished run has nothing left to do
    again = run(manifest, TrainConfig(**{**FAST, "epochs": 1, "eval_interval": 2}, out_dir=str(tmp_path / "r")))
    assert again.step == r.step and again.history == []
    with pytest.raises(OutOfData):  # every recording held out: no training batch at all
        run(manifest, TrainConfig(**{**FAST, "eval_fraction": 0.999999}, out_dir=str(tmp_path / "empty")))


def test_frame_sampling_is_a_function_of_the_step() -> None:
    a = torch.randperm(100, generator=frame_generator(1, 0, 5, 1))
    assert torch.equal(a, torch.randperm(100, generator=frame_generator(1, 0, 5, 1)))
    assert not torch.equal(a, torch.randperm(100, generator=frame_generator(1, 1, 5, 1)))


def test_torchrun_two_processes(manifest: str, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(yaml.safe_dump({**FAST, "num_workers": 1, "max_steps": 2, "checkpoint_interval": 2,
                                        "eval_interval": 2, "export_final": True, "tensorboard": True}))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.train", "--manifest", manifest, "--config", str(cfg_file), "--set", f"out_dir={out}"]
    # own session: on a timeout the ranks go down with torchrun instead of lingering
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:  # fmt: skip
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]

    state = load_checkpoint(out / "checkpoints" / "step-00000002.pt")
    assert state["world_size"] == 2 and len(state["loader"]) == 2 and len(state["rng"]) == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    assert any(r["kind"] == "eval" for r in records)
    assert all(r["decoder_frames"] > 0 and r["tokens_per_s"] > 0 for r in records if r["kind"] == "train")
    assert (out / "final" / "config.json").exists() and list((out / "tb").glob("events.out.tfevents.*"))

    # one process cannot take over the two ranks' loader positions
    with pytest.raises(ValueError, match="same world size"):
        run(manifest, TrainConfig(**{**FAST, "num_workers": 1, "max_steps": 3}, out_dir=str(out)))


def test_configs_validate() -> None:
    for path in sorted((ROOT / "configs").glob("train-*.yaml")):
        TrainConfig.from_yaml(path)
    for bad in ({"decoder_frame_ratio": 0}, {"grad_accum": 0}, {"no_such_field": 1}, {"model_overrides": {"x": 1}},
                {"max_steps": 10, "warmup_steps": 10}):  # fmt: skip
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_flow_parameters_are_manifest_and_config() -> None:
    from prefect.utilities.callables import parameter_schema

    from flows.train import train

    schema = parameter_schema(train.fn).model_dump()
    assert schema["required"] == ["manifest"]
    assert {"manifest", "config", "nproc_per_node"} <= schema["properties"].keys()
    assert "decoder_frame_ratio" in json.dumps(schema["definitions"])


@pytest.mark.slow
def test_trains_on_real_ingest_output(ingest_run: dict, tmp_path: Path) -> None:
    manifest = str(ingest_run["dir"] / "manifest.json")
    r = run(manifest, TrainConfig(**{**FAST, "eval_fraction": 0.0, "max_steps": 2}, out_dir=str(tmp_path / "t")))
    assert r.step == 2 and all(h["loss"] > 0 for h in r.history)


def test_batched_codebooks_head_matches_transformers() -> None:
    """training.model.batch_codebooks_head: the same logits and weight gradients as CsmCodebooksHead's loop."""
    from transformers.models.csm.modeling_csm import CsmCodebooksHead

    from training.model import batch_codebooks_head

    torch.manual_seed(0)
    ref = CsmCodebooksHead(hidden_size=16, num_codebooks=32, vocab_size=40)
    torch.nn.init.normal_(ref.weight)
    fast = CsmCodebooksHead(hidden_size=16, num_codebooks=32, vocab_size=40)
    fast.load_state_dict(ref.state_dict())
    batch_codebooks_head(fast)
    x = torch.randn(3, 31, 16)
    for cache_position in (None, torch.tensor([5])):
        h = x[:, :1] if cache_position is not None else x
        a, b = ref(h, cache_position), fast(h, cache_position)
        torch.testing.assert_close(b, a)
        a.square().sum().backward()
        b.square().sum().backward()
        torch.testing.assert_close(fast.weight.grad, ref.weight.grad)
        ref.weight.grad = fast.weight.grad = None
