"""GE2E speaker encoder (resemblyzer's real weights) as a pyannote.audio embedding Model.

pyannote's diarization pipeline asks its embedding for `(batch, 1, samples)` waveforms plus per-frame
speaker masks (`weights`) and wants one L2-normalised vector per item. The GE2E LSTM was trained on
1.6 s partials of 40-band *linear* (power) mel frames at 16 kHz, after resemblyzer's loudness
normalisation and silence trimming. This model reproduces that front end in torch, with the speaker
mask playing the part of resemblyzer's VAD trimming, so the weights see the inputs they were trained on.

Saved as an ordinary pyannote checkpoint (`pytorch_model.bin`), so `Model.from_pretrained(dir)` and the
pipeline's embedding loader both load it; this module must be importable (`tasks.speaker_embedding`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from pyannote.audio import Model
from pyannote.audio.core.task import Problem, Resolution, Specifications, Task
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence


class GE2EEmbedding(Model):
    """3x256 LSTM d-vector encoder (Wan et al. 2018), resemblyzer's front end and weights layout.

    Parameters mirror resemblyzer/hparams.py: 25 ms / 10 ms Hann STFT, 40 Slaney mel bands, power 2,
    centred frames with zero padding (librosa >= 0.10 defaults), partials of 160 frames.
    """

    def __init__(
        self,
        sample_rate: int = 16_000,
        num_channels: int = 1,
        n_fft: int = 400,
        hop_length: int = 160,
        n_mels: int = 40,
        hidden_size: int = 256,
        num_layers: int = 3,
        embedding_size: int = 256,
        partial_frames: int = 160,
        partial_step: int = 80,
        target_dbfs: float = -30.0,
        task: Task | None = None,
    ):
        super().__init__(sample_rate=sample_rate, num_channels=num_channels, task=task)
        self.save_hyperparameters(
            "sample_rate",
            "num_channels",
            "n_fft",
            "hop_length",
            "n_mels",
            "hidden_size",
            "num_layers",
            "embedding_size",
            "partial_frames",
            "partial_step",
            "target_dbfs",
        )
        if task is None:  # a checkpoint needs specifications; this model is never trained here
            self.specifications = Specifications(
                problem=Problem.REPRESENTATION,
                resolution=Resolution.CHUNK,
                duration=partial_frames * hop_length / sample_rate,
            )
        self.lstm = nn.LSTM(n_mels, hidden_size, num_layers, batch_first=True)
        self.linear = nn.Linear(hidden_size, embedding_size)
        # derived, not learned: kept out of the state dict so checkpoints hold only the GE2E weights
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("mel_basis", _slaney_mel_basis(sample_rate, n_fft, n_mels), persistent=False)

    @property
    def dimension(self) -> int:
        return int(self.hparams.embedding_size)

    def mel(self, waveforms: torch.Tensor) -> torch.Tensor:
        """(batch, samples) -> (batch, frames, n_mels) linear power mel, as resemblyzer.audio.wav_to_mel_spectrogram."""
        spec = torch.stft(
            waveforms,
            n_fft=self.hparams.n_fft,
            hop_length=self.hparams.hop_length,
            window=self.window,
            center=True,
            pad_mode="constant",
            return_complex=True,
        )
        return torch.matmul(self.mel_basis, spec.abs() ** 2).transpose(1, 2)

    def embed_partials(self, mels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(n, frames, n_mels) partials of `lengths` valid frames -> (n, dimension) L2-normalised d-vectors."""
        packed = pack_padded_sequence(mels, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (hidden, _) = self.lstm(packed)
        raw = F.relu(self.linear(hidden[-1]))
        return raw / raw.norm(dim=1, keepdim=True).clamp_min(1e-8)

    def forward(self, waveforms: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, 1, samples) waveforms, optional (batch, frames) speaker masks -> (batch, dimension).

        Items whose mask selects no frame get NaN, as pyannote's own pooling does; the pipeline drops them.
        """
        wav = waveforms[:, 0]
        batch, num_samples = wav.shape
        mel = self.mel(wav)
        num_frames = mel.shape[1]
        if weights is None:
            weights = torch.ones(batch, num_frames, device=wav.device)
        # masks come at the segmentation model's frame rate: stretch them to samples and to mel frames
        active_samples = F.interpolate(weights[:, None].float(), size=num_samples, mode="nearest")[:, 0] > 0.5
        active_frames = F.interpolate(weights[:, None].float(), size=num_frames, mode="nearest")[:, 0] > 0.5

        # resemblyzer.audio.normalize_volume(increase_only=True), measured on this speaker's own samples;
        # mel power scales with gain squared, so apply it there
        power = (wav**2 * active_samples).sum(1) / active_samples.sum(1).clamp_min(1)
        dbfs = 10 * torch.log10(power.clamp_min(1e-20))
        gain_db = (self.hparams.target_dbfs - dbfs).clamp_min(0.0)
        mel = mel * (10 ** (gain_db / 10))[:, None, None]

        partials, lengths, owner = [], [], []
        size, step = self.hparams.partial_frames, self.hparams.partial_step
        for b in range(batch):
            frames = mel[b][active_frames[b]]  # masked frames, like resemblyzer's trimmed silences
            n = frames.shape[0]
            if n == 0:
                continue
            starts = list(range(0, max(1, n - size + 1), step))
            if starts[-1] + size < n:  # cover the tail with one more full-length partial
                starts.append(n - size)
            for s in starts:
                piece = frames[s : s + size]
                partials.append(F.pad(piece, (0, 0, 0, size - piece.shape[0])))
                lengths.append(piece.shape[0])
                owner.append(b)

        out = torch.full((batch, self.dimension), float("nan"), device=wav.device)
        if not partials:
            return out
        owner_t = torch.tensor(owner, device=wav.device)
        embeds = self.embed_partials(torch.stack(partials), torch.tensor(lengths))
        # utterance embedding = L2-normalised mean of its partial embeddings (VoiceEncoder.embed_utterance)
        sums = torch.zeros(batch, self.dimension, device=wav.device).index_add_(0, owner_t, embeds)
        has = torch.bincount(owner_t, minlength=batch) > 0
        out[has] = F.normalize(sums[has], dim=1)
        return out


def _slaney_mel_basis(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """(n_mels, n_fft//2+1) filters equal to librosa.filters.mel defaults (Slaney scale and area norm)."""
    import torchaudio

    fb = torchaudio.functional.melscale_fbanks(
        n_freqs=n_fft // 2 + 1,
        f_min=0.0,
        f_max=sample_rate / 2,
        n_mels=n_mels,
        sample_rate=sample_rate,
        norm="slaney",
        mel_scale="slaney",
    )
    return fb.T.contiguous()


def resemblyzer_weights() -> Path:
    """The GE2E checkpoint that the resemblyzer package ships (real pretrained weights)."""
    import resemblyzer

    return Path(resemblyzer.__file__).resolve().parent / "pretrained.pt"


def build_ge2e_checkpoint(dest_dir: Path, weights: Path | None = None) -> Path:
    """Write `dest_dir/pytorch_model.bin`: a pyannote checkpoint of GE2EEmbedding with the GE2E weights."""
    import lightning

    weights = weights or resemblyzer_weights()
    state = torch.load(weights, map_location="cpu", weights_only=False)["model_state"]
    model = GE2EEmbedding()
    # similarity_weight/bias belong to the GE2E training loss only
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("similarity_")}, strict=True)
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    model.on_save_checkpoint(checkpoint)  # pyannote's own hook adds versions, architecture, specifications
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / "pytorch_model.bin"
    torch.save(checkpoint, path)
    return path
