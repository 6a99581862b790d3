"""The default-model recipe end to end: corpus, tokenizer, model, card; saved to a directory."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, fields
from pathlib import Path

import torch
import transformers

from editflow.demo.corpus import build_corpus, load_records
from editflow.demo.options import CorpusOptions, TrainOptions
from editflow.demo.scoring import counterfact_triples, preference_rate
from editflow.demo.tokenizer import train_tokenizer
from editflow.demo.train import train_model


def _write_lines(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(d.replace("\n", " ") + "\n" for d in docs))


def build_default_model(
    records_path: str | Path | list[str | Path], out_dir: str | Path, corpus_dir: str | Path | None = None, **options
) -> dict:
    """Run the whole recipe: corpus, tokenizer, model; save to ``out_dir`` and return the card.

    ``options`` are :class:`TrainOptions` and :class:`CorpusOptions` fields (unset ones keep the
    recipe's defaults, which rebuild the shipped model). The statistics/held-out text goes to
    ``corpus_dir`` (default ``out_dir/corpus``).
    """
    paths = records_path if isinstance(records_path, list) else [records_path]
    records = load_records(paths)
    corpus_keys = {f.name for f in fields(CorpusOptions)}
    train_keys = {f.name for f in fields(TrainOptions)}
    unknown = set(options) - corpus_keys - train_keys
    if unknown:
        raise TypeError(f"unknown options: {sorted(unknown)}")
    opts = TrainOptions(**{k: v for k, v in options.items() if k in train_keys})
    corpus_opts = CorpusOptions(**{k: v for k, v in options.items() if k in corpus_keys})
    corpus = build_corpus(records, seed=opts.seed, **asdict(corpus_opts))
    tok = train_tokenizer(corpus.train, opts.vocab_size)
    model, summary = train_model(corpus, tok, records, opts)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    cdir = Path(corpus_dir) if corpus_dir is not None else out / "corpus"
    _write_lines(cdir / "stats.txt", corpus.stats)
    _write_lines(cdir / "heldout.txt", corpus.heldout)

    triples = counterfact_triples(records)
    card = {
        "model": "GPT-2 architecture, trained from scratch by editflow.demo",
        "training_data": {
            "records": [Path(p).name for p in paths],
            "n_records": len(records),
            "n_train_documents": len(corpus.train),
            "n_stats_documents": len(corpus.stats),
            "n_heldout_documents": len(corpus.heldout),
            "n_heldout_phrasing_prompts": len(corpus.heldout_phrasings),
            "description": "CounterFact true facts (rewrite, paraphrase, neighbourhood, attribute prompts), "
            "extra phrasings of each relation for record and neighbourhood subjects, made-up "
            "subject attributes, synthetic filler; subject-bottleneck attention mask on a share "
            "of subject-fact documents (options.subject_bottleneck)",
            "n_subject_documents": len(corpus.subject_of),
        },
        "n_params": summary["n_params"],
        "vocab_size": len(tok),
        "seed": opts.seed,
        "train_minutes": round(summary["train_minutes"], 2),
        "steps": summary["steps"],
        "chosen_step": summary["chosen_step"],
        "options": asdict(opts),
        "corpus_options": asdict(corpus_opts),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "pre_edit": {k: preference_rate(model, tok, v) for k, v in triples.items()},
        "history": summary["history"],
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card
