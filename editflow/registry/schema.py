"""The registry's schema, in one place: the ``editflow.*`` tag names editflow writes on model versions,
registered models and runs, the aliases it moves, and the lineage keys of a model's ``editflow.json``.

Tag values are strings (MLflow's rule); lineage values are JSON. A version's tags name its lineage
for search and display, ``editflow.json`` carries it with the weights.
"""

from __future__ import annotations

TAG = "editflow."

# --------------------------------------------------------------------------- aliases

CANDIDATE = "candidate"
PRODUCTION = "production"

# --------------------------------------------------------------------------- model-version tags

#: ``base`` (registered in full) or ``edit`` (made by an edit run).
ROLE_TAG = TAG + "role"
ROLE_BASE = "base"
ROLE_EDIT = "edit"
FINGERPRINT_TAG = TAG + "fingerprint"  # content hash of the weights (editflow.models.fingerprint)
SOURCE_TAG = TAG + "source"  # a base: where it was loaded from
STORAGE_TAG = TAG + "storage"  # "full" or "delta"
N_FACTS_TAG = TAG + "n_facts"  # facts edited in this version (0 for a base)
PARENT_VERSION_TAG = TAG + "parent_version"
BASE_VERSION_TAG = TAG + "base_version"  # the root base of the lineage
#: Headline post-edit figures: ``editflow.metric.<name>`` (two decimals). An edit version's other
#: facts (algorithm, mode, requests digest, fingerprint, edit state, root references) are in its
#: ``editflow.json`` (the lineage keys below), its run (``ModelVersion.run_id``) and its description.
METRIC_TAG_PREFIX = TAG + "metric."
#: The gate's decision (``passed`` or ``failed: reasons``); also a tag of the edit run.
GATE_TAG = TAG + "gate"
#: Edit defaults chosen by ``editflow tune`` (compact JSON, see :mod:`editflow.registry.tuned`).
TUNED_TAG = TAG + "tuned"
#: Set atomically with the version and cleared last: a version is usable only once it is gone.
PENDING_TAG = TAG + "pending"
REGISTRAR_TAG = TAG + "registrar"  # owner (host:pid:start) of the registering process
DIGEST_TAG = TAG + "weights_sha256"  # digest of the weights manifest in editflow.json
#: A base registered from a GGUF file also carries ``GgufInfo.tags()`` (:mod:`editflow.gguf_source`),
#: each under :data:`TAG` (see :func:`prefixed`); bases are found again by the file's digest.
GGUF_SHA256_TAG = TAG + "gguf.sha256"

#: Read from versions registered before these moved into ``editflow.json``; never written.
LEGACY_EDIT_STATE_SHA256_TAG = TAG + "edit_state.sha256"
LEGACY_ROOT_REFERENCE_TAGS = {"drift_ppl": TAG + "root.drift_ppl", "heldout": TAG + "root.heldout"}

# --------------------------------------------------------------------------- registered-model tags

#: A production move in progress (JSON), see :mod:`editflow.registry.promotion`.
INTENT_TAG = TAG + "promotion_intent"

# --------------------------------------------------------------------------- run tags

OWNER_TAG = TAG + "owner"  # the process running the run (orphan detection)
ERROR_TAG = TAG + "error"  # why a run FAILED
PROMOTION_ERROR_TAG = TAG + "promotion_error"
PROMOTED_TAG = TAG + "promoted"  # "true" or "false"
#: ``editflow.stats.<key digest>`` = ``computed``: this run computed that statistics entry.
STATS_TAG_PREFIX = TAG + "stats."
ROLE_TUNE = "tune"  # ROLE_TAG of a tune run
TUNE_MODEL_TAG = TAG + "tune.model"
TUNE_VERSION_TAG = TAG + "tune.version"
TUNE_BEST_TRIAL_TAG = TAG + "tune.best_trial"
TUNE_STOPPED_TAG = TAG + "tune.stopped"
TUNE_MESSAGE_TAG = TAG + "tune.message"

# --------------------------------------------------------------------------- editflow.json (lineage)

STORAGE_KEY = "storage"
BASE_VERSION_KEY = "base_version"
PARENT_VERSION_KEY = "parent_version"
SOURCE_KEY = "source"
MODEL_DEFAULTS_KEY = "model_defaults"  # the model's own edit recommendations (hparams, stats_tokens)
GGUF_KEY = "gguf"  # a base from a GGUF file: GgufInfo.to_dict()
BASE_ARTIFACT_URI_KEY = "base_artifact_uri"  # a delta: where its root base's weights are
BASE_MODEL_URI_KEY = "base_model_uri"  # a delta: models:/NAME/<root base version>
BASE_WEIGHTS_SHA256_KEY = "base_weights_sha256"  # passed to save_model: the base manifest's digest
REQUESTS_DIGEST_KEY = "requests_digest"
N_FACTS_KEY = "n_facts"
RUN_ID_KEY = "run_id"
HPARAMS_KEY = "hparams"
EDITED_TENSORS_KEY = "edited_tensors"  # a delta: the tensors it stores
WEIGHTS_SHA256_KEY = "weights_sha256"  # the weights manifest (see editflow.registry.integrity)
FINGERPRINT_KEY = "fingerprint"  # an edit: content hash of its weights (editflow.models.fingerprint)
#: An edit: the lineage's edit state logged in its run (sha256, bytes, n_keys, dtype; editflow.edit_state).
EDIT_STATE_KEY = "edit_state"
#: An edit: the root base's references carried from version to version (summary metric -> value).
ROOT_REFERENCES_KEY = "root_references"
ROOT_REFERENCE_METRICS = ("drift_ppl", "heldout")
#: How the drift text was chosen when the root's ``drift_ppl`` was measured (root_references key
#: ``drift_slice``; absent = 1): 1 = all held-out text, 2 = text about no edited or bundled subject
#: (:func:`editflow.evaluate.drift_texts`). A root perplexity from another slice is not compared.
DRIFT_SLICE_KEY = "drift_slice"
DRIFT_SLICE = 2


def prefixed(tags: dict[str, str]) -> dict[str, str]:
    """``{"gguf.sha256": v}`` -> ``{"editflow.gguf.sha256": v}``."""
    return {TAG + k: v for k, v in tags.items()}


def metric_tag(name: str) -> str:
    """``editflow.metric.<name>``."""
    return METRIC_TAG_PREFIX + name


def stats_tag(key: str) -> str:
    """``editflow.stats.<first 32 characters of the key digest>``."""
    return STATS_TAG_PREFIX + str(key)[:32]


def is_edit(tags: dict[str, str]) -> bool:
    """Whether a version with ``tags`` was made by an edit (not a base)."""
    return tags.get(ROLE_TAG) == ROLE_EDIT
