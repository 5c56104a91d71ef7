"""The pipeline config: one strict, typed YAML per workspace pipeline, read by `mmfeat run` / `mmfeat serve`.

It names the sources to ingest, the extractors and their models, the splits, graphs and exports to build, how
snapshots are named, the cron schedules and the forget requests to serve. Unknown keys and bad values fail at load
time with a message naming the key, what was expected and the fix. In the YAML, `${VAR}` and `${VAR:-default}` are
replaced from the environment, and relative input paths resolve against the config file's folder.

    >>> cfg = load_config("recipes/configs/demo.yaml")
    >>> [e.feature for e in cfg.extract]
    ['caption', 'clip_image', 'text', 'caption_text']
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from zoneinfo import ZoneInfo

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from recipes.splits import SplitConfig
from stores.erasure.requests import ForgetRequest
from stores.strict import strict_config

CONFIG_DIR = Path(__file__).parent / "configs"
_NAME = r"^[a-z][a-z0-9_\-]{0,62}$"
_FEATURE = r"^[a-z][a-z0-9_]{0,62}$"
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
Name = Annotated[str, Field(pattern=_NAME)]
Feature = Annotated[str, Field(pattern=_FEATURE)]


class ConfigError(ValueError):
    """A config that cannot be used: every line names the file, the key, the problem and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- sources -----------------------------------------------------------------------------------------------------


class DemoSource(_Strict):
    """The synthetic catalog of recipes/ingest/demo_data.py, generated into `dir` (once per parameters) and ingested as a
    table source. `dir` defaults to `<workspace>-source/<name>` beside a local workspace."""

    kind: Literal["demo"]
    name: Name = "demo"
    dir: str | None = None
    n_items: int = Field(120, ge=1)
    n_users: int = Field(60, ge=1)
    interactions_per_user: int = Field(20, ge=2)
    seed: int = 0


class TableSource(_Strict):
    """CSV / Parquet / JSONL tables (`mmfeat ingest table`). `image_template` derives each item's image path from
    its id where the items file has no image column (H&M: "{item_id:.3}/{item_id}.jpg"); items whose file is
    absent get no image. `event` is the event name for interaction rows that carry none."""

    kind: Literal["table"]
    name: Name
    items: str
    interactions: str | None = None
    users: str | None = None
    images: str | None = None
    map: dict[str, str] = Field(default_factory=dict)
    image_template: str | None = None
    event: str | None = None


class MovieLensSource(_Strict):
    """MovieLens-100K (`u.item`, `u.user`, `u.data`), optionally with a TMDB items CSV and a posters folder."""

    kind: Literal["movielens"]
    name: Name = "movielens"
    path: str
    items_csv: str | None = None
    posters: str | None = None


class MMRecSource(_Strict):
    """An MMRec dataset folder (`<name>.inter`); items and users are derived from the interactions."""

    kind: Literal["mmrec"]
    name: Name = "mmrec"
    path: str


class RecBoleSource(_Strict):
    """RecBole atomic files (`<name>.inter` + optional `.item`, `.user`)."""

    kind: Literal["recbole"]
    name: Name = "recbole"
    path: str


class AmazonSource(_Strict):
    """The Amazon review catalogues' raw files (`mmfeat ingest amazon`): a reviews and a metadata JSON-lines file,
    2014/2018 or 2023 layout, gzipped or not. `images: false` ingests without downloading the image URLs."""

    kind: Literal["amazon"]
    name: Name = "amazon"
    reviews: str
    meta: str
    images: bool = True


Source = Annotated[
    DemoSource | TableSource | MovieLensSource | MMRecSource | RecBoleSource | AmazonSource,
    Field(discriminator="kind"),
]


# ---- extractors --------------------------------------------------------------------------------------------------

_DEFAULT_INPUT = {"caption": "image", "clip_image": "image", "clip_text": "text", "text": "text"}


class ExtractorConfig(_Strict):
    """One feature to extract. kind: caption (writes the `captions` table; feature must be "caption"),
    clip_image, clip_text or text (sentence-transformers; model None = the packaged all-MiniLM-L6-v2).
    input: image, text (the item `fields` joined) or caption (needs a caption extractor earlier in the list)."""

    feature: Feature
    kind: Literal["caption", "clip_image", "clip_text", "text"]
    model: str | None = None
    pretrained: str | None = None
    input: Literal["image", "text", "caption"] | None = None
    fields: list[Literal["title", "text", "attributes"]] = Field(default_factory=lambda: ["title", "text"])
    prompt: str | None = None
    max_new_tokens: int = Field(40, ge=1)
    # transformers (default; CPU or GPU) or vllm (GPU only, the optional vllm extra: extractors/vllm_captioner.py)
    caption_engine: Literal["transformers", "vllm"] = "transformers"
    batch_size: int = Field(64, ge=1)
    concurrency: int | None = Field(None, ge=1)
    chunk_rows: int = Field(1024, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> ExtractorConfig:
        source = self.source
        if self.kind == "caption" and self.feature != "caption":
            raise ValueError(
                f"a caption extractor writes the captions table: set feature: caption (got {self.feature!r})"
            )
        if self.kind != "caption" and self.feature == "caption":
            raise ValueError(
                "feature name 'caption' is reserved for kind: caption; name the vectors e.g. caption_text"
            )
        if self.kind in ("caption", "clip_image") and source != "image":
            raise ValueError(
                f"kind {self.kind} reads images: drop input or set input: image (got {source!r})"
            )
        if self.kind in ("clip_text", "text") and source == "image":
            raise ValueError(f"kind {self.kind} reads text: set input: text or input: caption")
        if self.kind in ("caption", "clip_image", "clip_text") and not self.model:
            raise ValueError(
                f"kind {self.kind} needs model: (e.g. test:tiny-clip offline, ViT-B-32 with pretrained:)"
            )
        if self.caption_engine != "transformers" and self.kind != "caption":
            raise ValueError(f"caption_engine applies to kind: caption; drop it from kind {self.kind}")
        if self.prompt is not None and self.kind != "caption":
            raise ValueError(f"prompt applies to kind: caption only; remove it from {self.feature}")
        if self.pretrained is not None and not self.kind.startswith("clip"):
            raise ValueError(
                f"pretrained applies to clip_image / clip_text only; remove it from {self.feature}"
            )
        return self

    @property
    def source(self) -> str:
        return self.input or _DEFAULT_INPUT[self.kind]


# ---- splits, graphs, exports -------------------------------------------------------------------------------------


@strict_config
class SplitSpec(SplitConfig):
    """A named split: `name` plus the fields of recipes.splits.SplitConfig (cutoff dates as ISO dates, UTC)."""

    name: Name = dataclasses.field(kw_only=True)

    def to_split_config(self) -> SplitConfig:
        """The split's recipe config without its name (what the step fingerprints, so renaming rebuilds nothing)."""
        return SplitConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SplitConfig)})


class UserItemGraph(_Strict):
    type: Literal["user_item"]
    split: Name
    norm: Literal["none", "sym", "lattice"] = "sym"
    name: str | None = None


class KnnGraph(_Strict):
    type: Literal["knn"]
    split: Name
    features: list[Feature] = Field(min_length=1)
    weights: list[float] | None = None
    k: int = Field(10, ge=1)
    norm: Literal["freedom", "lattice", "none"] = "freedom"
    symmetric: bool = False
    self_loops: bool = True
    name: str | None = None

    @model_validator(mode="after")
    def _weights(self) -> KnnGraph:
        if self.weights is not None and len(self.weights) != len(self.features):
            raise ValueError(
                f"{len(self.features)} features but {len(self.weights)} weights; give one weight each"
            )
        return self


class CooccurGraph(_Strict):
    type: Literal["cooccur"]
    split: Name
    kind: Literal["item", "user"] = "item"
    k: int = Field(10, ge=1)
    weight: Literal["count", "jaccard"] = "count"
    name: str | None = None


class HyperGraph(_Strict):
    type: Literal["hyper"]
    split: Name
    kind: Literal["user", "item"] = "user"
    knn: list[str] = Field(default_factory=list)
    name: str | None = None


Graph = Annotated[UserItemGraph | KnnGraph | CooccurGraph | HyperGraph, Field(discriminator="type")]


class SemanticIdSpec(_Strict):
    """Semantic IDs `refresh` builds after the graphs (`mmfeat semantic-ids`; recipes/semantic_ids.py), skipped
    while the features' contents are unchanged."""

    name: Name
    features: list[Feature] = Field(min_length=1)
    weights: list[float] | None = None
    levels: int = Field(3, ge=1)
    codebook: int = Field(256, ge=2)
    method: Literal["rq-kmeans", "rq-vae"] = "rq-kmeans"
    balanced: bool = False
    steps: int = Field(1000, ge=1)
    latent: int = Field(64, ge=1)
    pca: int | None = Field(None, ge=1)
    seed: int = 0
    missing: Literal["mean", "drop"] = "mean"

    @model_validator(mode="after")
    def _check(self) -> SemanticIdSpec:
        if self.weights is not None and len(self.weights) != len(self.features):
            raise ValueError(
                f"{len(self.features)} features but {len(self.weights)} weights; give one weight each"
            )
        self.quantiser()  # method/balanced combinations fail at load time
        return self

    def quantiser(self) -> Any:
        """The recipe's SemanticIdConfig (what the step fingerprints)."""
        from recipes.semantic_ids import SemanticIdConfig

        keys = ("levels", "codebook", "method", "balanced", "steps", "latent", "pca", "seed")
        return SemanticIdConfig(**{k: getattr(self, k) for k in keys})


class ExportSpec(_Strict):
    """An export of a split; `out` may use {workspace} (a local workspace's path)."""

    split: Name
    format: Literal["mmrec", "recbole", "pyg"]
    out: str = "{workspace}-exports/{format}"
    features: dict[str, Feature] = Field(default_factory=dict)
    name: str | None = None
    user_graph_k: int = Field(0, ge=0)
    missing: Literal["mean", "zero", "drop"] = "mean"  # items lacking a feature (stores/missing.py)
    semantic_ids: Name | None = None  # a `semantic_ids` entry whose codes go beside the split


class SnapshotSpec(_Strict):
    """The snapshot `refresh` publishes when anything it pins changed. `name` is a template over {config},
    {date} (UTC datetime, e.g. {date:%Y%m%d}) and {n} (this config's snapshot count + 1). The name is rendered
    once, before the run does any work; when a snapshot already has it (a second publishing run on the same day
    under a dated template) the run publishes as `<name>-2`, `-3`, ...: snapshots are never overwritten, and a
    run whose pins did not change publishes nothing and reports the last snapshot."""

    name: str = "{config}-{date:%Y%m%d-%H%M%S}"
    split: Name
    features: list[Feature] | None = None
    graphs: list[str] | None = None
    semantic_ids: list[str] | None = None

    @field_validator("name")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            rendered = value.format(config="x", date=datetime.now(UTC), n=1)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"bad template {value!r} ({exc}); use the fields {{config}}, {{date}}, {{n}}"
            ) from None
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", rendered):
            raise ValueError(
                f"template {value!r} renders to {rendered!r}; names may hold letters, digits, . _ -"
            )
        return value


class Schedule(_Strict):
    """A cron schedule (5 fields, minute hour day month weekday) for one flow of this config."""

    cron: str
    timezone: str = "UTC"
    flow: Literal["refresh", "ingest", "extract", "recipes", "forget"] = "refresh"
    name: str | None = None

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        check_cron(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except Exception:
            raise ValueError(
                f"unknown timezone {value!r}; use an IANA name such as UTC or Europe/Paris"
            ) from None
        return value


class RunSettings(_Strict):
    """How flows run: `engine` ray (local Ray, or the cluster at $RAY_ADDRESS / `ray_address`) or local (no Ray);
    per-step timeout and retries of transient failures (a retried extraction resumes from its committed chunks).
    `recipes_engine` runs the splits and user-item graphs: auto (in memory, streamed above 2M rows), memory,
    stream, or ray (Ray tasks over partitions of the table, on the same cluster; same output, see
    recipes/distributed.py)."""

    engine: Literal["ray", "local"] = "ray"
    recipes_engine: Literal["auto", "memory", "stream", "ray"] = "auto"
    ray_address: str | None = None
    step_timeout_s: float = Field(3600, gt=0)
    retries: int = Field(2, ge=0, le=10)
    retry_delay_s: float = Field(5, ge=0)


class ReportSpec(_Strict):
    """The HTML report written at the end of `refresh`; `out` may use {workspace} (a local workspace's path)."""

    out: str = "{workspace}-report.html"


class PipelineConfig(_Strict):
    """One workspace pipeline; see the module docstring and recipes/configs/*.yaml."""

    name: Name
    description: str | None = None
    workspace: str | None = None
    sources: list[Source] = Field(min_length=1)
    extract: list[ExtractorConfig] = Field(default_factory=list)
    splits: list[SplitSpec] = Field(default_factory=list)
    graphs: list[Graph] = Field(default_factory=list)
    semantic_ids: list[SemanticIdSpec] = Field(default_factory=list)
    exports: list[ExportSpec] = Field(default_factory=list)
    snapshot: SnapshotSpec | None = None
    report: ReportSpec | None = None
    schedules: list[Schedule] = Field(default_factory=list)
    forget: list[ForgetRequest] = Field(default_factory=list)
    run: RunSettings = Field(default_factory=RunSettings)
    _base: Path = PrivateAttr(default_factory=Path.cwd)
    _file: Path | None = PrivateAttr(default=None)
    # each expanded string -> the ${VAR} text it came from, so a missing path names its variable
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _references(self) -> PipelineConfig:
        _unique("sources", [s.name for s in self.sources])
        _unique("extract", [e.feature for e in self.extract])
        _unique("splits", [s.name for s in self.splits])
        _unique("forget", [f.request_id for f in self.forget])
        splits = [s.name for s in self.splits]
        vectors = [e.feature for e in self.extract if e.kind != "caption"]
        seen: set[str] = set()
        for i, e in enumerate(self.extract):
            if e.source == "caption" and "caption" not in seen:
                raise ValueError(
                    f"extract[{i}] ({e.feature}) reads captions: put a kind: caption extractor before it"
                )
            seen.add(e.feature)
        for i, g in enumerate(self.graphs):
            _known(f"graphs[{i}].split", g.split, splits, "splits")
            if isinstance(g, KnnGraph):
                for f in g.features:
                    _known(f"graphs[{i}].features", f, vectors, "extract (vector features)")
        graph_names = [graph_name(g) for g in self.graphs]
        _unique("graphs", graph_names)
        for i, g in enumerate(self.graphs):
            if isinstance(g, HyperGraph):
                for ref in g.knn:
                    _known(f"graphs[{i}].knn", ref, graph_names[:i], "the graphs listed before it")
        sid_names = [s.name for s in self.semantic_ids]
        _unique("semantic_ids", sid_names)
        for i, sid in enumerate(self.semantic_ids):
            for f in sid.features:
                _known(f"semantic_ids[{i}].features", f, vectors, "extract (vector features)")
        for i, x in enumerate(self.exports):
            _known(f"exports[{i}].split", x.split, splits, "splits")
            if x.semantic_ids is not None:
                _known(f"exports[{i}].semantic_ids", x.semantic_ids, sid_names, "semantic_ids")
            for f in x.features.values():
                _known(f"exports[{i}].features", f, vectors, "extract (vector features)")
        if self.snapshot is not None:
            _known("snapshot.split", self.snapshot.split, splits, "splits")
            for f in self.snapshot.features or []:
                _known("snapshot.features", f, vectors, "extract (vector features)")
            for g in self.snapshot.graphs or []:
                _known("snapshot.graphs", g, graph_names, "graphs")
            for sid in self.snapshot.semantic_ids or []:
                _known("snapshot.semantic_ids", sid, sid_names, "semantic_ids")
        return self

    # ---- paths -------------------------------------------------------------------------------------------------
    @property
    def base_dir(self) -> Path:
        """The folder relative input paths resolve against (the config file's folder)."""
        return self._base

    @property
    def file(self) -> Path | None:
        return self._file

    def source(self, name: str) -> Any:
        return next(s for s in self.sources if s.name == name)

    def extractor(self, feature: str) -> ExtractorConfig:
        return next(e for e in self.extract if e.feature == feature)

    def path(self, value: str | None) -> Path | None:
        """An input path of this config, resolved against the config's folder."""
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self._base / p).resolve()

    def input_path(self, value: str | None, what: str) -> Path | None:
        """`path(value)`, which must exist: a missing one is a one-line `SourceError` naming the environment
        variable the path came from (`MMFEAT_HM is not set ...; export MMFEAT_HM=...`) or the config file to fix."""
        from recipes.ingest.records import SourceError

        path = self.path(value)
        if path is None or path.exists():
            return path
        raw = self._origins.get(value or "", "")
        names = [m.group(1) for m in _ENV.finditer(raw)]
        where = self._file or "the config"
        if not names:
            raise SourceError(
                f"{what} {path} not found; fix the path in {where} (relative paths resolve against {self._base})"
            )
        var = names[0]
        if os.environ.get(var):
            raise SourceError(
                f"{what} {path} not found: {var}={os.environ[var]!r} does not hold it; "
                f"point {var} at the folder that does"
            )
        raise SourceError(
            f"{what} {path} not found: {var} is not set, so the default of {raw!r} in {where} was used; "
            f"export {var}=/path/to/the/data"
        )

    def snapshot_features(self) -> list[str]:
        if self.snapshot and self.snapshot.features is not None:
            return list(self.snapshot.features)
        return [e.feature for e in self.extract if e.kind != "caption"]

    def snapshot_graphs(self) -> list[str]:
        if self.snapshot and self.snapshot.graphs is not None:
            return list(self.snapshot.graphs)
        split = self.snapshot.split if self.snapshot else None
        return [graph_name(g) for g in self.graphs if g.split == split]

    def snapshot_semantic_ids(self) -> list[str]:
        if self.snapshot and self.snapshot.semantic_ids is not None:
            return list(self.snapshot.semantic_ids)
        return [s.name for s in self.semantic_ids]


def graph_name(g: UserItemGraph | KnnGraph | CooccurGraph | HyperGraph) -> str:
    """The stored name of a configured graph: its `name`, else one derived from its parameters (a valid LanceDB
    table name: features joined with "_")."""
    if g.name:
        return g.name
    if isinstance(g, UserItemGraph):
        return f"{g.split}_ui_{g.norm}"
    if isinstance(g, KnnGraph):
        return f"{g.split}_knn_{'_'.join(g.features)}_k{g.k}_{g.norm}"
    if isinstance(g, CooccurGraph):
        return f"{g.split}_cooccur_{g.kind}_k{g.k}_{g.weight}"
    return f"{g.split}_hyper_{g.kind}"


def output_path(template: str, workspace_uri: str, **fields: str) -> Path:
    """An output path: {workspace} is a local workspace's path (the current folder's name for remote ones)."""
    local = workspace_uri if "://" not in workspace_uri else workspace_uri.rstrip("/").rsplit("/", 1)[-1]
    return Path(template.format(workspace=local, **fields)).expanduser().resolve()


def _unique(key: str, names: list[str]) -> None:
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ValueError(f"{key}: names {dups} appear more than once; give each entry its own name")


def _known(key: str, value: str, valid: list[str], where: str) -> None:
    if value not in valid:
        hint = difflib.get_close_matches(value, valid, n=1)
        raise ValueError(
            f"{key}: {value!r} is not defined in {where} (defined: {valid or 'none'})"
            + (f"; did you mean {hint[0]!r}?" if hint else "")
        )


# ---- cron --------------------------------------------------------------------------------------------------------

_CRON_FIELDS = [
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 7),
]
_CRON_NAMES = {
    3: ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"],
    4: ["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
}


def check_cron(expr: str) -> None:
    """Raise ValueError naming the bad field unless `expr` is a 5-field cron expression (or @daily/@hourly/...)."""
    if expr.strip() in ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"):
        return
    parts = expr.split()
    if len(parts) != 5:
        raise ValueError(
            f"cron {expr!r} has {len(parts)} fields; write 5: minute hour day month weekday, "
            "e.g. '0 3 * * *' (03:00 daily)"
        )
    for idx, (part, (label, lo, hi)) in enumerate(zip(parts, _CRON_FIELDS, strict=True)):
        names = _CRON_NAMES.get(idx, [])
        for item in part.split(","):
            rng, _, step = item.partition("/")
            if step and not step.isdigit():
                raise ValueError(f"cron {expr!r}: step {step!r} in the {label} field is not a number")
            if rng == "*":
                continue
            for bound in rng.split("-", 1):
                value = names.index(bound.lower()) + (idx == 3) if bound.lower() in names else bound
                if not str(value).isdigit() or not lo <= int(value) <= hi:
                    raise ValueError(f"cron {expr!r}: {bound!r} in the {label} field is outside {lo}-{hi}")


# ---- loading -----------------------------------------------------------------------------------------------------


def expand_env(text: str) -> str:
    """Replace ${VAR} and ${VAR:-default}; an unset ${VAR} without a default is an error naming it."""

    def sub(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if value:
            return value
        if default is None:
            raise ConfigError(f"${{{name}}} is not set; export {name}=... or write ${{{name}:-default}}")
        return default

    return _ENV.sub(sub, text)


def load_config(path: str | Path) -> PipelineConfig:
    """Read, expand and validate a pipeline YAML; a name without a folder is looked up in recipes/configs/."""
    file = Path(path)
    if (
        not file.exists()
        and file.parent == Path(".")
        and (CONFIG_DIR / file.with_suffix(".yaml").name).exists()
    ):
        file = CONFIG_DIR / file.with_suffix(".yaml").name
    if not file.exists():
        shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(
            f"config file {path} not found; pass a YAML path or a shipped config name ({shipped})"
        )
    text = file.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(expand_env(text))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    cfg = parse_config(data, base_dir=file.resolve().parent, label=str(file), file=file.resolve())
    cfg._origins = _env_origins(text)
    return cfg


def _env_origins(text: str) -> dict[str, str]:
    """Each string value of the YAML that uses ${VAR}, expanded -> as written, so that a missing input path can
    name the variable it came from."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}
    out: dict[str, str] = {}
    stack = [raw]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str) and _ENV.search(node):
            out[expand_env(node)] = node
    return out


def parse_config(
    data: Any, base_dir: str | Path | None = None, label: str = "config", file: Path | None = None
) -> PipelineConfig:
    """Validate an already-parsed mapping (what a test or a deployment parameter passes)."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{label}: expected a mapping of keys (name, sources, extract, ...), got {type(data).__name__}"
        )
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(f"{label}: {line}" for line in explain(exc))) from None
    cfg._base = Path(base_dir or Path.cwd()).resolve()
    cfg._file = file
    return cfg


def explain(exc: ValidationError) -> list[str]:
    """One line per error: the dotted key, what is wrong and the fix (valid keys, did-you-mean)."""
    lines = []
    for err in exc.errors():
        model, key = _walk(err["loc"])
        kind, msg = err["type"], err["msg"].removeprefix("Value error, ")
        if kind in ("extra_forbidden", "unexpected_keyword_argument"):  # models, dataclasses
            field = str(err["loc"][-1])
            valid = sorted(_fields(model)) if model else []
            hint = difflib.get_close_matches(field, valid, n=1)
            lines.append(
                f"{key}: unknown key"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
                + f" Valid keys here: {', '.join(valid)}."
            )
        elif kind == "missing":
            lines.append(f"{key}: required key is missing; add it")
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            ctx = err.get("ctx", {})
            disc = ctx.get("discriminator", "").strip("'")
            lines.append(
                f"{key}.{disc}: "
                + (
                    f"{ctx.get('tag')!r} is not one of {ctx.get('expected_tags')}"
                    if kind == "union_tag_invalid"
                    else f"missing; set {disc}: to say which kind"
                )
            )
        elif kind == "literal_error":
            valid = re.findall(r"'([^']*)'", err.get("ctx", {}).get("expected", ""))
            hint = difflib.get_close_matches(str(err.get("input")), valid, n=1)
            lines.append(
                f"{key}: {err.get('input')!r} is not allowed; use one of {', '.join(valid)}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
        elif not err["loc"]:
            lines.append(msg)  # cross-reference checks name their own key
        else:
            shown = err.get("input")
            value = "" if isinstance(shown, (dict, list)) or kind == "value_error" else f"{shown!r}: "
            lines.append(f"{key}: {value}{msg}")
    return lines


def _walk(loc: tuple) -> tuple[type | None, str]:
    """Follow an error location through the models: the model that holds the last key, and the key as
    `graphs[1].features` (discriminator tags dropped)."""
    ann: Any = PipelineConfig
    model: type | None = PipelineConfig
    key = ""
    for i, part in enumerate(loc):
        ann = _unwrap(ann)
        members = _union_members(ann)
        if members and isinstance(part, str):
            picked = next((m for m in members if part in _tags(m)), None)
            if picked is not None:
                ann = picked
                continue
        if isinstance(part, int):
            key += f"[{part}]"
            args = typing.get_args(ann)
            ann = args[0] if args else Any
            continue
        key += ("." if key else "") + str(part)
        if isinstance(ann, type) and (issubclass(ann, BaseModel) or dataclasses.is_dataclass(ann)):
            model = ann
            fields = _fields(ann)
            if i < len(loc) - 1 and part in fields:
                ann = fields[part]
        elif typing.get_origin(ann) is dict:
            ann = typing.get_args(ann)[1]
    return model, key or "(top level)"


def _fields(model: type) -> dict[str, Any]:
    """Field name -> annotation of a pydantic model or of a recipe's dataclass config (SplitSpec)."""
    if issubclass(model, BaseModel):
        return {name: f.annotation for name, f in model.model_fields.items()}
    return typing.get_type_hints(model)


def _unwrap(ann: Any) -> Any:
    while typing.get_origin(ann) is Annotated:
        ann = typing.get_args(ann)[0]
    if typing.get_origin(ann) in (Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return ann


def _union_members(ann: Any) -> list[type[BaseModel]]:
    if typing.get_origin(ann) in (Union, types.UnionType):
        return [a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
    return []


def _tags(model: type[BaseModel]) -> list[str]:
    out = []
    for name in ("kind", "type"):
        field = model.model_fields.get(name)
        if field is not None and typing.get_origin(field.annotation) is Literal:
            out += [str(v) for v in typing.get_args(field.annotation)]
    return out


def shipped_configs() -> list[Path]:
    return sorted(CONFIG_DIR.glob("*.yaml"))


# ---- sources to RawSource ----------------------------------------------------------------------------------------


def demo_dir(cfg: PipelineConfig, spec: DemoSource, workspace_uri: str) -> Path:
    if spec.dir:
        return cfg.path(spec.dir)
    return output_path("{workspace}-source", workspace_uri) / spec.name


def source_files(cfg: PipelineConfig, spec: Any, workspace_uri: str) -> list[Path]:
    """The files a source reads (folders walked), for the cheap changed-or-not check before an ingest."""
    if isinstance(spec, DemoSource):
        roots = [demo_dir(cfg, spec, workspace_uri)]
    elif isinstance(spec, TableSource):
        roots = [cfg.path(p) for p in (spec.items, spec.interactions, spec.users, spec.images) if p]
    elif isinstance(spec, MovieLensSource):
        roots = [cfg.path(p) for p in (spec.path, spec.items_csv, spec.posters) if p]
    elif isinstance(spec, AmazonSource):
        roots = [cfg.path(spec.reviews), cfg.path(spec.meta)]
    else:
        roots = [cfg.path(spec.path)]
    files: list[Path] = []
    for root in roots:
        files += sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    return files


def open_source(cfg: PipelineConfig, spec: Any, workspace_uri: str):
    """Read a configured source into a `RawSource` with the adapters of recipes/ingest/sources.py (the demo catalog is
    generated first, once per parameters)."""
    from recipes.ingest import sources

    if isinstance(spec, DemoSource):
        root = ensure_demo_catalog(demo_dir(cfg, spec, workspace_uri), spec)
        src = sources.table(
            root / "items.csv", root / "interactions.csv", root / "users.csv", root / "images", name=spec.name
        )
    elif isinstance(spec, TableSource):
        src = sources.table(
            cfg.input_path(spec.items, "items file"),
            cfg.input_path(spec.interactions, "interactions file"),
            cfg.input_path(spec.users, "users file"),
            cfg.input_path(spec.images, "images folder"),
            dict(spec.map),
            spec.name,
        )
        if spec.image_template:
            src.items = template_images(src.items, spec.image_template, cfg.path(spec.images))
        if spec.event:
            src.default_event = spec.event
    elif isinstance(spec, MovieLensSource):
        src = sources.movielens(
            cfg.input_path(spec.path, "MovieLens folder"),
            cfg.input_path(spec.items_csv, "items CSV"),
            cfg.input_path(spec.posters, "posters folder"),
        )
    elif isinstance(spec, MMRecSource):
        src = sources.mmrec(cfg.input_path(spec.path, "MMRec folder"))
    elif isinstance(spec, AmazonSource):
        from recipes.ingest.amazon import amazon

        src = amazon(
            cfg.input_path(spec.reviews, "Amazon reviews file"),
            cfg.input_path(spec.meta, "Amazon metadata file"),
            spec.name,
            images=spec.images,
        )
    else:
        src = sources.recbole(cfg.input_path(spec.path, "RecBole folder"))
    return src


def ensure_demo_catalog(root: Path, spec: DemoSource) -> Path:
    """Generate the demo catalog into `root` unless it was generated there with the same parameters (so rows
    appended to it later, as a test does, stay)."""
    import json

    from recipes.ingest.demo_data import generate_catalog

    params = spec.model_dump(exclude={"kind", "name", "dir"})
    marker = root / ".mmfeat-demo.json"
    if marker.exists() and json.loads(marker.read_text()) == params and (root / "items.csv").exists():
        return root
    generate_catalog(
        root,
        n_items=spec.n_items,
        n_users=spec.n_users,
        seed=spec.seed,
        interactions_per_user=spec.interactions_per_user,
    )
    marker.write_text(json.dumps(params))
    return root


def template_images(items, template: str, root: Path | None):
    """Add an `image` column from `template` formatted with the row's item_id, where that file exists
    (`ingest table --image-template` and a table source's `image_template`)."""
    import pyarrow as pa

    if items is None or "image" in items.column_names:
        return items
    paths = []
    for raw in items["item_id"].to_pylist():
        item_id = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw or "")
        try:
            rel = template.format(item_id=item_id.strip())
        except (KeyError, IndexError, ValueError) as exc:
            from recipes.ingest.records import SourceError

            raise SourceError(
                f"image template {template!r} does not format ({type(exc).__name__}: {exc}); use only "
                "{item_id}, e.g. '{item_id:.3}/{item_id}.jpg'"
            ) from None
        paths.append(rel if root is not None and (root / rel).is_file() else None)
    return items.append_column("image", pa.array(paths, pa.string()))


def has_image_file(items, root: Path | None) -> bool:
    """Whether any item's `image` path names a file under `root` (what `ingest table --images` warns about)."""
    if items is None or root is None or "image" not in items.column_names:
        return False
    for raw in items["image"].to_pylist():
        rel = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        try:
            if rel and rel.strip() and (root / rel.strip()).is_file():
                return True
        except (OSError, ValueError):  # a name the OS refuses (too long, NUL): the ingest quarantines it
            continue
    return False
