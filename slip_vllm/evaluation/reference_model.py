"""The project's reference model: a small Llama LM trained from scratch, deterministically, on the stdlib.

No model hub is reachable, so the evidence (quality, attacks, cost) is measured on a model the project
trains itself, on a corpus every machine has (:mod:`slip_vllm.evaluation.corpus`):

1. a byte-level BPE tokenizer (``tokenizers``; vocabulary :attr:`ReferenceConfig.vocab_size`) trained on
   the training files only, saved as a ``PreTrainedTokenizerFast`` with bos/eos/pad and a chat template;
2. a ``LlamaForCausalLM`` (head_dim 64, which vLLM's CPU attention supports) initialised from a fixed
   seed and trained with AdamW (linear warm-up, cosine decay, gradient clipping) for a fixed number of
   tokens, in a fixed data order, on a fixed number of threads, with deterministic algorithms;
3. validation perplexity, a unigram baseline on the same predicted tokens, and the bookkeeping needed
   to check a rerun (corpus digest, tokenizer and weight hashes) in ``metrics.json``.

Results are cached under ``<repo>/.cache/reference/<key>/`` where the key names the Python version and
hashes the configuration and the corpus digest; a later call reuses the directory. The same machinery
builds a *base / fine-tune pair* for the public-prior scenario (base trained on the ``base`` part of the
corpus, then fully fine-tuned on the ``finetune`` part).

The building blocks are public for the evaluation code: :func:`train` (continue training any model for
N tokens, e.g. a fine-tuning attack from the public artifact), :func:`evaluate_perplexity`,
:func:`next_token_agreement`, :func:`unigram_perplexity` and :func:`load_reference_data` (the exact
token streams a reference model was trained and validated on).

CLI: ``python -m slip_vllm.evaluation.reference_model [--tiny] [--force] [--pair]`` prints the metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from slip_vllm.evaluation.corpus import Corpus, CorpusSpec, build_corpus, python_tag

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE_DIR = REPO_ROOT / ".cache" / "reference"

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
FORMAT_VERSION = 1  # bump when the training recipe changes in a way the config does not capture


@dataclass(frozen=True)
class ReferenceConfig:
    """Everything that determines a reference model (hashed into its cache key)."""

    name: str = "full"
    # corpus
    corpus_max_bytes: int | None = None
    val_percent: int = 10
    # tokenizer
    vocab_size: int = 4096
    # model (LlamaForCausalLM)
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    rope_theta: float = 10000.0
    # training
    seq_len: int = 256
    batch_size: int = 8
    train_tokens: int = 1_500_000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    num_threads: int = 2
    # evaluation: validation tokens scored (None = all), batch size for scoring
    eval_tokens: int | None = None
    eval_batch_size: int = 16
    # base / fine-tune pair (public-prior scenario)
    base_tokens: int = 1_500_000
    finetune_tokens: int = 500_000
    finetune_lr: float = 5e-4

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def corpus_spec(self) -> CorpusSpec:
        return CorpusSpec(max_bytes=self.corpus_max_bytes, val_percent=self.val_percent)

    def train_kwargs(self) -> dict:
        return dict(seq_len=self.seq_len, batch_size=self.batch_size, lr=self.lr, min_lr_ratio=self.min_lr_ratio,
                    warmup_fraction=self.warmup_fraction, weight_decay=self.weight_decay,
                    grad_clip=self.grad_clip, seed=self.seed, num_threads=self.num_threads)

    def eval_kwargs(self) -> dict:
        return dict(seq_len=self.seq_len, batch_size=self.eval_batch_size, max_tokens=self.eval_tokens,
                    num_threads=self.num_threads)


# Default, sized by measurement on the 2-core development machine (5.3 M parameters, ~3 200 training
# tokens/s on 2 idle cores): 1.5 M tokens (~0.73 epoch of the 2.05 M-token training stream) take about
# 8 minutes, scoring all ~400 k validation tokens about 1 more. A first run at 2.0 M tokens on a busy
# machine (another job on the cores) took 22 minutes of training and reached validation perplexity
# 62.4 against a unigram baseline of 736; the budget was cut so a busy machine stays within 20 minutes.
FULL = ReferenceConfig()
# For tests and smoke runs: a few seconds on one core.
TINY = ReferenceConfig(
    name="tiny", corpus_max_bytes=300_000, vocab_size=512, hidden_size=64, intermediate_size=176,
    num_layers=2, num_heads=2, num_kv_heads=2, max_position_embeddings=128, initializer_range=0.05,
    seq_len=64, batch_size=8, train_tokens=65_536, lr=5e-3, eval_tokens=8192, base_tokens=49_152,
    finetune_tokens=16_384, finetune_lr=2e-3, num_threads=1,
)
PRESETS = {"full": FULL, "tiny": TINY}


# --------------------------------------------------------------------------------------------------
# determinism helpers


@contextlib.contextmanager
def deterministic(num_threads: int | None):
    """Fix the intra-op thread count and require deterministic algorithms; restore both afterwards."""
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.set_num_threads(prev_threads)


def state_dict_sha256(model_or_state: torch.nn.Module | dict) -> str:
    """Hash of every tensor's name, dtype, shape and bytes (sorted by name)."""
    sd = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# tokenizer and token streams


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """Byte-level BPE trained on ``texts``; returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN)
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1 << 30  # the corpus is tokenized whole; windows are cut afterwards
    return fast


def tokenizer_sha256(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def encode_documents(tokenizer, texts: Iterable[str]) -> torch.Tensor:
    """Token stream of ``texts`` in order, each document followed by EOS, as int64 tensor."""
    texts = list(texts)
    eos = tokenizer.eos_token_id
    encs = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []
    out: list[int] = []
    for e in encs:
        out.extend(e.ids)
        out.append(eos)
    return torch.tensor(out, dtype=torch.long)


@dataclass
class ReferenceData:
    """The exact token streams behind a reference model (train/val, optionally one corpus part)."""

    tokenizer: object
    corpus: Corpus
    train_ids: torch.Tensor
    val_ids: torch.Tensor
    part: str | None


def load_reference_data(model_dir: str | Path, part: str | None = "from-metrics") -> ReferenceData:
    """Rebuild the corpus and token streams a cached model was trained on; checks the corpus digest.

    ``part`` defaults to the part the model was trained on (``None`` = whole corpus).
    """
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    metrics = json.loads((model_dir / "metrics.json").read_text())
    cfg = ReferenceConfig(**metrics["config"])
    corpus = build_corpus(cfg.corpus_spec())
    if corpus.digest != metrics["corpus_digest"]:
        raise RuntimeError(f"the stdlib corpus of this interpreter ({corpus.python}, digest {corpus.digest[:12]}) "
                           f"differs from the one {model_dir} was trained on ({metrics['corpus_digest'][:12]})")
    if part == "from-metrics":
        part = metrics.get("train_part")
    tok = AutoTokenizer.from_pretrained(model_dir)
    return ReferenceData(tok, corpus, encode_documents(tok, corpus.texts("train", part)),
                         encode_documents(tok, corpus.texts("val", part)), part)


# --------------------------------------------------------------------------------------------------
# model, training


def make_model(cfg: ReferenceConfig, tokenizer) -> torch.nn.Module:
    """A freshly initialised LlamaForCausalLM (initialisation seeded by ``cfg.seed``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.hidden_size % cfg.num_heads:
        raise ValueError("hidden_size must be divisible by num_heads")
    hf = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=1e-5,
        initializer_range=cfg.initializer_range, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_theta=cfg.rope_theta, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, architectures=["LlamaForCausalLM"], torch_dtype="float32",
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(hf).to(torch.float32)


def _epoch_windows(n_ids: int, seq_len: int, seed: int, epoch: int) -> np.ndarray:
    """Start offsets of the non-overlapping windows of one epoch, in a seeded order.

    Each epoch shifts the window grid by a seeded offset so repeated epochs see different cuts.
    """
    rng = np.random.default_rng([seed, epoch, 0x511F])
    shift = 0 if epoch == 0 else int(rng.integers(0, seq_len))
    starts = np.arange(shift, n_ids - seq_len + 1, seq_len, dtype=np.int64)
    if starts.size == 0:
        starts = np.zeros(1, dtype=np.int64)
    return starts[rng.permutation(starts.size)]


def training_windows(n_ids: int, n_tokens: int, seq_len: int, seed: int) -> np.ndarray:
    """Start offsets of the ``max(1, n_tokens // seq_len)`` training windows, in training order."""
    if n_ids < 2:
        raise ValueError("token stream too short to train on")
    seq_len = min(seq_len, n_ids)
    n_seq = max(1, n_tokens // seq_len)
    chunks, have, epoch = [], 0, 0
    while have < n_seq:
        starts = _epoch_windows(n_ids, seq_len, seed, epoch)
        chunks.append(starts[: n_seq - have])
        have += chunks[-1].size
        epoch += 1
    return np.concatenate(chunks)


@dataclass
class TrainResult:
    tokens: int  # tokens fed to the model (sequences x seq_len)
    steps: int
    sequences: int
    epochs: float  # tokens / len(token stream)
    final_loss: float  # mean loss of the last 10 % of steps
    losses: list[float]
    wall_s: float


def train(model: torch.nn.Module, token_ids: torch.Tensor, n_tokens: int, *, seq_len: int = 256,
          batch_size: int = 8, lr: float = 2e-3, min_lr_ratio: float = 0.1, warmup_fraction: float = 0.05,
          weight_decay: float = 0.1, grad_clip: float = 1.0, betas: tuple[float, float] = (0.9, 0.95),
          seed: int = 0, num_threads: int | None = 2, init_state_dict: dict | None = None,
          trainable: Iterable[torch.nn.Parameter] | None = None, progress: bool = True,
          desc: str = "train") -> TrainResult:
    """Train ``model`` (in place, full fine-tuning by default) on ``n_tokens`` tokens of ``token_ids``.

    Deterministic for fixed arguments: windows of ``seq_len`` tokens are cut from the stream in a seeded
    order (re-shuffled and re-cut per epoch when ``n_tokens`` exceeds the stream), AdamW with linear
    warm-up and cosine decay to ``min_lr_ratio * lr``, gradient clipping, a fixed thread count. Budgets
    below one window train on a single window. ``init_state_dict`` is loaded first (e.g. the public
    residual for a fine-tuning attack); ``trainable`` restricts the optimised parameters (e.g. LoRA
    adapters; defaults to every parameter). Weight decay applies to matrices only.
    """
    from tqdm.auto import tqdm

    token_ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    seq_len = min(seq_len, token_ids.numel())
    starts = training_windows(token_ids.numel(), n_tokens, seq_len, seed)
    n_seq = int(starts.size)
    steps = math.ceil(n_seq / batch_size)
    warmup = max(1, round(warmup_fraction * steps)) if warmup_fraction > 0 else 0

    def lr_at(step: int) -> float:  # multiplier of lr for the update of step `step` (0-based)
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    t0 = time.perf_counter()
    losses: list[float] = []
    with deterministic(num_threads):
        if init_state_dict is not None:
            model.load_state_dict(init_state_dict)
        params = [p for p in (trainable if trainable is not None else model.parameters()) if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, eps=1e-8)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        offsets = torch.arange(seq_len)
        was_training = model.training
        model.train()
        bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
        for step in bar:
            batch_starts = torch.from_numpy(starts[step * batch_size:(step + 1) * batch_size])
            batch = token_ids[batch_starts[:, None] + offsets[None, :]]
            out = model(input_ids=batch, labels=batch, use_cache=False)
            loss = out.loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if progress and (step % 10 == 0 or step == steps - 1):
                bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        bar.close()
        model.train(was_training)
    tail = losses[-max(1, len(losses) // 10):]
    return TrainResult(tokens=n_seq * seq_len, steps=steps, sequences=n_seq,
                       epochs=n_seq * seq_len / token_ids.numel(), final_loss=float(np.mean(tail)),
                       losses=losses, wall_s=time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------------
# evaluation


def load_model(model_dir: str | Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def _as_model(model_or_dir) -> torch.nn.Module:
    return model_or_dir if isinstance(model_or_dir, torch.nn.Module) else load_model(model_or_dir)


def eval_windows(val_ids: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows of ``val_ids`` (the last may be shorter, at least 2 tokens).

    Each window of length L scores L - 1 next-token predictions; ``max_tokens`` caps the number of
    validation tokens used (a prefix of the stream). Later evaluations (e.g. through vLLM) should use
    the same windows to be comparable.
    """
    val_ids = torch.as_tensor(val_ids, dtype=torch.long).flatten()
    if max_tokens is not None:
        val_ids = val_ids[:max_tokens]
    wins = [val_ids[i:i + seq_len] for i in range(0, val_ids.numel(), seq_len)]
    return [w for w in wins if w.numel() >= 2]


def eval_targets(val_ids: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """The tokens :func:`evaluate_perplexity` predicts (every window but its first token)."""
    wins = eval_windows(val_ids, seq_len, max_tokens)
    return torch.cat([w[1:] for w in wins]) if wins else torch.zeros(0, dtype=torch.long)


def _batched_windows(wins: list[torch.Tensor], batch_size: int):
    for i in range(0, len(wins), batch_size):
        group = wins[i:i + batch_size]
        lengths = {w.numel() for w in group}
        if len(lengths) == 1:
            yield torch.stack(group)
        else:  # only the final short window differs in length: score it on its own
            full = [w for w in group if w.numel() == group[0].numel()]
            if full:
                yield torch.stack(full)
            for w in group[len(full):]:
                yield w[None]


@torch.no_grad()
def _scores(model, val_ids, seq_len, batch_size, max_tokens, num_threads, want):
    model = _as_model(model)
    wins = eval_windows(val_ids, seq_len, max_tokens)
    if not wins:
        raise ValueError("validation stream too short")
    nll, count, argmaxes = 0.0, 0, []
    with deterministic(num_threads):
        was_training = model.training
        model.eval()
        for batch in _batched_windows(wins, batch_size):
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            if want == "nll":
                logp = torch.log_softmax(logits, dim=-1)
                nll += -float(logp.gather(-1, batch[:, 1:, None]).double().sum())
                count += batch[:, 1:].numel()
            else:
                argmaxes.append(logits.argmax(-1).flatten())
        model.train(was_training)
    return (nll, count) if want == "nll" else torch.cat(argmaxes)


def evaluate_perplexity(model_or_dir, val_ids: torch.Tensor, *, seq_len: int = 256, batch_size: int = 16,
                        max_tokens: int | None = None, num_threads: int | None = 2) -> float:
    """Teacher-forced validation perplexity: exp(mean next-token NLL) over :func:`eval_windows`."""
    nll, count = _scores(model_or_dir, val_ids, seq_len, batch_size, max_tokens, num_threads, "nll")
    return math.exp(nll / count)


def teacher_forced_argmax(model_or_dir, val_ids: torch.Tensor, *, seq_len: int = 256, batch_size: int = 16,
                          max_tokens: int | None = None, num_threads: int | None = 2) -> torch.Tensor:
    """Greedy next-token prediction at every scored position of :func:`eval_windows` (flattened)."""
    return _scores(model_or_dir, val_ids, seq_len, batch_size, max_tokens, num_threads, "argmax")


def next_token_agreement(model_a, model_b, val_ids: torch.Tensor, *, seq_len: int = 256, batch_size: int = 16,
                         max_tokens: int | None = None, num_threads: int | None = 2) -> float:
    """Fraction of positions where the two models' greedy next tokens agree (teacher-forced on val)."""
    kw = dict(seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens, num_threads=num_threads)
    a = teacher_forced_argmax(model_a, val_ids, **kw)
    b = teacher_forced_argmax(model_b, val_ids, **kw)
    return float((a == b).double().mean())


def unigram_perplexity(train_ids: torch.Tensor, val_ids: torch.Tensor, vocab_size: int | None = None) -> float:
    """Perplexity on ``val_ids`` of the add-one-smoothed unigram distribution of ``train_ids``."""
    train_ids = torch.as_tensor(train_ids, dtype=torch.long).flatten()
    val_ids = torch.as_tensor(val_ids, dtype=torch.long).flatten()
    v = vocab_size or int(max(train_ids.max(), val_ids.max())) + 1
    counts = torch.bincount(train_ids, minlength=v).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return math.exp(-float(logp[val_ids].mean()))


# --------------------------------------------------------------------------------------------------
# cached builds


def cache_key(cfg: ReferenceConfig, corpus: Corpus, kind: str = "reference") -> str:
    """``<python>-<preset>-<kind>-<hash of recipe version, configuration and corpus digest>``.

    The tokenizer depends only on the corpus and the vocabulary size, so its key hashes just those.
    """
    fields = {"vocab_size": cfg.vocab_size} if kind == "tokenizer" else asdict(cfg)
    blob = json.dumps({"format": FORMAT_VERSION, "kind": kind, "config": fields, "corpus": corpus.digest},
                      sort_keys=True)
    return f"{python_tag()}-{cfg.name}-{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _versions() -> dict:
    import tokenizers
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "numpy": np.__version__}


def _tmp_dir(final: Path) -> Path:
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, final: Path, force: bool) -> None:
    """Move a finished build into place (atomic rename; an existing result is replaced only if forced)."""
    if final.exists():
        if not force:
            shutil.rmtree(tmp, ignore_errors=True)  # someone else finished first: keep theirs
            return
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def _save(model, tokenizer, out: Path) -> None:
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    max_len = tokenizer.model_max_length
    tokenizer.model_max_length = model.config.max_position_embeddings
    try:
        tokenizer.save_pretrained(out)
    finally:
        tokenizer.model_max_length = max_len


def _is_complete(d: Path) -> bool:
    return (d / "metrics.json").is_file()


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _get_tokenizer(cfg: ReferenceConfig, corpus: Corpus, root: Path, force: bool, progress: bool):
    """The tokenizer is shared by the reference model and the pair: trained once on all training files."""
    from transformers import AutoTokenizer

    d = root / cache_key(cfg, corpus, "tokenizer")
    if not _is_complete(d) or force:
        _log(progress, f"training tokenizer (vocab {cfg.vocab_size}) on {len(corpus.select('train'))} files")
        t0 = time.perf_counter()
        tok = train_tokenizer(corpus.texts("train"), cfg.vocab_size)
        tmp = _tmp_dir(d)
        tok.save_pretrained(tmp)
        (tmp / "metrics.json").write_text(json.dumps({"tokenizer_sha256": tokenizer_sha256(tok),
                                                      "wall_s": time.perf_counter() - t0}, indent=1))
        _publish(tmp, d, force)
    return AutoTokenizer.from_pretrained(d)


def _finish(model, tokenizer, out_final: Path, metrics: dict, corpus: Corpus, force: bool) -> Path:
    tmp = _tmp_dir(out_final)
    _save(model, tokenizer, tmp)
    (tmp / "corpus.json").write_text(json.dumps(corpus.manifest(), indent=1))
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
    _publish(tmp, out_final, force)
    return out_final


def get_reference_model(cache_dir: str | Path | None = None, config: ReferenceConfig = FULL, *,
                        force: bool = False, progress: bool = True) -> Path:
    """Directory of the trained reference model (Hugging Face format + ``metrics.json``), cached.

    Trains on first use (about 9 minutes for :data:`FULL` on 2 idle cores); later calls return the
    cached directory immediately. ``force`` retrains and replaces it.
    """
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    corpus = build_corpus(config.corpus_spec())
    final = root / cache_key(config, corpus)
    if _is_complete(final) and not force:
        return final
    t0 = time.perf_counter()
    tokenizer = _get_tokenizer(config, corpus, root, force, progress)
    train_ids = encode_documents(tokenizer, corpus.texts("train"))
    val_ids = encode_documents(tokenizer, corpus.texts("val"))
    _log(progress, f"corpus {corpus.python}: {len(corpus.files)} files, {corpus.n_bytes() / 1e6:.2f} MB; "
                   f"train {train_ids.numel()} tokens, val {val_ids.numel()} tokens")
    model = make_model(config, tokenizer)
    res = train(model, train_ids, config.train_tokens, **config.train_kwargs(), progress=progress,
                desc=f"reference[{config.name}]")
    t_eval = time.perf_counter()
    ppl = evaluate_perplexity(model, val_ids, **config.eval_kwargs())
    targets = eval_targets(val_ids, config.seq_len, config.eval_tokens)
    metrics = {
        "kind": "reference",
        "val_ppl": ppl,
        "unigram_val_ppl": unigram_perplexity(train_ids, targets, len(tokenizer)),
        "val_tokens_scored": int(targets.numel()),
        "train_tokens": res.tokens,
        "train_steps": res.steps,
        "train_epochs": res.epochs,
        "train_stream_tokens": int(train_ids.numel()),
        "val_stream_tokens": int(val_ids.numel()),
        "final_train_loss": res.final_loss,
        "train_wall_s": res.wall_s,
        "eval_wall_s": time.perf_counter() - t_eval,
        "wall_s": time.perf_counter() - t0,
        "n_params": sum(p.numel() for p in model.parameters()),
        "train_part": None,
        "corpus_digest": corpus.digest,
        "python": corpus.python,
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "weights_sha256": state_dict_sha256(model),
        "seed": config.seed,
        "config": asdict(config),
        "versions": _versions(),
        "created_unix": time.time(),
    }
    return _finish(model, tokenizer, final, metrics, corpus, force)


def get_base_finetune_pair(cache_dir: str | Path | None = None, config: ReferenceConfig = FULL, *,
                           force: bool = False, progress: bool = True) -> tuple[Path, Path]:
    """(base_dir, finetuned_dir) for the public-prior scenario, cached.

    The base model is trained from scratch on the ``base`` part's training files for
    ``config.base_tokens`` tokens; the fine-tuned model starts from it and is fully fine-tuned on the
    ``finetune`` part's training files for ``config.finetune_tokens`` tokens at ``config.finetune_lr``.
    Both use the reference tokenizer. Each ``metrics.json`` reports validation perplexity on both parts.
    """
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    corpus = build_corpus(config.corpus_spec())
    pair_root = root / cache_key(config, corpus, "pair")
    base_final, ft_final = pair_root / "base", pair_root / "finetuned"
    if _is_complete(base_final) and _is_complete(ft_final) and not force:
        return base_final, ft_final
    pair_root.mkdir(parents=True, exist_ok=True)
    tokenizer = _get_tokenizer(config, corpus, root, False, progress)
    ids = {(s, p): encode_documents(tokenizer, corpus.texts(s, p)) for s in ("train", "val")
           for p in ("base", "finetune")}
    ekw = config.eval_kwargs()

    def part_metrics(model) -> dict:
        out = {}
        for p in ("base", "finetune"):
            targets = eval_targets(ids["val", p], config.seq_len, config.eval_tokens)
            out[f"val_ppl_{p}"] = evaluate_perplexity(model, ids["val", p], **ekw)
            out[f"unigram_val_ppl_{p}"] = unigram_perplexity(ids["train", p], targets, len(tokenizer))
        return out

    common = {"corpus_digest": corpus.digest, "python": corpus.python, "seed": config.seed,
              "tokenizer_sha256": tokenizer_sha256(tokenizer), "config": asdict(config), "versions": _versions()}

    # base
    if _is_complete(base_final) and not force:
        base = load_model(base_final)
    else:
        base = make_model(config, tokenizer)
        res = train(base, ids["train", "base"], config.base_tokens, **config.train_kwargs(), progress=progress,
                    desc=f"base[{config.name}]")
        metrics = {"kind": "base", "train_part": "base", "train_tokens": res.tokens, "train_steps": res.steps,
                   "train_epochs": res.epochs, "train_wall_s": res.wall_s, "final_train_loss": res.final_loss,
                   **part_metrics(base), "weights_sha256": state_dict_sha256(base), **common}
        metrics["val_ppl"] = metrics["val_ppl_base"]
        metrics["unigram_val_ppl"] = metrics["unigram_val_ppl_base"]
        _finish(base, tokenizer, base_final, metrics, corpus, force)
        force = True  # a new base invalidates any old fine-tuned model

    # fine-tuned
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    ft = make_model(config, tokenizer)
    kw = {**config.train_kwargs(), "lr": config.finetune_lr, "seed": config.seed + 1}
    res = train(ft, ids["train", "finetune"], config.finetune_tokens, **kw, init_state_dict=base_sd,
                progress=progress, desc=f"finetune[{config.name}]")
    metrics = {"kind": "finetuned", "train_part": "finetune", "base_weights_sha256": state_dict_sha256(base_sd),
               "train_tokens": res.tokens, "train_steps": res.steps, "train_epochs": res.epochs,
               "train_wall_s": res.wall_s, "final_train_loss": res.final_loss, "finetune_lr": config.finetune_lr,
               **part_metrics(ft), "weights_sha256": state_dict_sha256(ft), **common}
    metrics["val_ppl"] = metrics["val_ppl_finetune"]
    metrics["unigram_val_ppl"] = metrics["unigram_val_ppl_finetune"]
    _finish(ft, tokenizer, ft_final, metrics, corpus, force)
    return base_final, ft_final


def read_metrics(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / "metrics.json").read_text())


def training_token_budget(model_dir: str | Path) -> int:
    """Tokens the model at ``model_dir`` was trained on (the base for the 0.1/1/10 % attack budgets)."""
    return int(read_metrics(model_dir)["train_tokens"])


# --------------------------------------------------------------------------------------------------
# CLI


def _summary(m: dict) -> dict:
    keys = ("kind", "val_ppl", "unigram_val_ppl", "val_ppl_base", "val_ppl_finetune", "unigram_val_ppl_base",
            "unigram_val_ppl_finetune", "train_tokens", "train_steps", "train_epochs", "train_wall_s",
            "wall_s", "n_params", "corpus_digest", "tokenizer_sha256", "weights_sha256", "seed", "python")
    return {k: m[k] for k in keys if k in m}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slip_vllm.evaluation.reference_model",
                                 description="Train (or reuse) the reference model and print its metrics.")
    ap.add_argument("--tiny", action="store_true", help="tiny configuration (seconds; for smoke tests)")
    ap.add_argument("--force", action="store_true",
                    help="retrain even if cached; reports whether the rerun reproduced the cached result")
    ap.add_argument("--pair", action="store_true", help="also build the base / fine-tune pair")
    ap.add_argument("--cache-dir", type=Path, default=None, help=f"default: {DEFAULT_CACHE_DIR}")
    ap.add_argument("--threads", type=int, default=None, help="override the configured thread count")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    args = ap.parse_args(argv)

    cfg = TINY if args.tiny else FULL
    if args.threads is not None:
        cfg = dataclasses.replace(cfg, num_threads=args.threads)
    root = args.cache_dir if args.cache_dir is not None else DEFAULT_CACHE_DIR
    corpus = build_corpus(cfg.corpus_spec())
    previous = None
    prev_dir = root / cache_key(cfg, corpus)
    if args.force and _is_complete(prev_dir):
        previous = read_metrics(prev_dir)
    t0 = time.perf_counter()
    ref = get_reference_model(root, cfg, force=args.force, progress=not args.quiet)
    m = read_metrics(ref)
    report = {"reference": {"dir": str(ref), "reused": time.perf_counter() - t0 < 0.5 * m["wall_s"],
                            **_summary(m)}}
    if previous is not None:
        report["rerun"] = {
            "previous_val_ppl": previous["val_ppl"],
            "same_val_ppl_3_sig_digits": f"{previous['val_ppl']:.3g}" == f"{m['val_ppl']:.3g}",
            "same_val_ppl_exact": previous["val_ppl"] == m["val_ppl"],
            "same_weights": previous["weights_sha256"] == m["weights_sha256"],
            "previous_train_wall_s": previous["train_wall_s"],
        }
    if args.pair:
        base, ft = get_base_finetune_pair(root, cfg, force=args.force, progress=not args.quiet)
        report["base"] = {"dir": str(base), **_summary(read_metrics(base))}
        report["finetuned"] = {"dir": str(ft), **_summary(read_metrics(ft))}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
