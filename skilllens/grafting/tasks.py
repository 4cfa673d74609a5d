"""Tasks for fine-tuning and grafting, and their teacher-forced scoring.

A :class:`GraftTask` holds train/dev/test items and a kind:

* ``"classification"`` (LM-BFF style): the prompt ends in a template (``...\\nLanguage:``) and the
  model picks one of the task's *label words* (``" English"``, ``" German"``...). The loss is the
  cross-entropy over the label words' first tokens at the last prompt position; the score is the
  accuracy; confidence is the top label probability.
* ``"generation"``: plain causal-LM on prompt/answer pairs; loss = mean NLL of the answer tokens,
  score = teacher-forced token accuracy (argmax == gold token), confidence = top-token probability.

Built-in tasks from ``shared/data`` (see :data:`TASKS`): ``xquad-lang`` (language of an XQuAD
paragraph), ``xquad-numeric`` (is the answer to an XQuAD question a number?), ``gsm8k-calc`` (the
first GSM8K solution step in ``<<a*b=c>>`` calculator notation) and ``synthetic`` (a byte-level
toy task for tests).

>>> task = build_task("synthetic", n_train=4, n_dev=2, n_test=2)
>>> task.kind, len(task.train), task.label_words
('classification', 4, ('x', 'y'))
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from skilllens.core.batching import clamp_length, encode_items, pad_id, right_padded
from skilllens.data import Item, find_data_file, read_text
from skilllens.errors import DataError

KINDS = ("classification", "generation")


@dataclass
class GraftTask:
    """Items for one task; classification items carry ``meta["label"]`` (index into label_words)."""

    name: str
    kind: str
    train: list[Item]
    dev: list[Item]
    test: list[Item]
    label_words: tuple[str, ...] = ()
    spec: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise DataError(f"unknown task kind {self.kind!r}; use one of {KINDS}")
        if self.kind == "classification" and len(self.label_words) < 2:
            raise DataError(f"classification task {self.name!r} needs at least 2 label words")
        if not self.train:
            raise DataError(f"task {self.name!r} has no training items; raise n_train")


# ---------------------------------------------------------------- encoding

@dataclass
class TaskData:
    """Tokenised items on one device: ``input_ids``/``attention_mask`` ``[B, T]``; ``rows, cols``
    index the predicting positions (one per item for classification, one per answer token
    otherwise) and ``targets`` holds label indices (classification) or gold token ids."""

    kind: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    label_ids: torch.Tensor | None = None

    @property
    def n_items(self) -> int:
        return int(self.input_ids.shape[0])

    def subset(self, idx: list[int]) -> "TaskData":
        """The items ``idx`` (re-indexed rows)."""
        sel = torch.tensor(idx, device=self.input_ids.device)
        keep = torch.isin(self.rows, sel)
        remap = torch.full((self.n_items,), -1, dtype=torch.long, device=sel.device)
        remap[sel] = torch.arange(len(idx), device=sel.device)
        return TaskData(self.kind, self.input_ids[sel], self.attention_mask[sel],
                        remap[self.rows[keep]], self.cols[keep], self.targets[keep],
                        self.label_ids)

    def chunks(self, batch_size: int):
        for s in range(0, self.n_items, batch_size):
            yield self.subset(list(range(s, min(s + batch_size, self.n_items))))


def label_token_ids(tokenizer, words) -> list[int]:
    """First token id of each label word (tried as given, then stripped); must be distinct."""
    for variant in (list(words), [w.strip() for w in words]):
        ids = [tokenizer(w, add_special_tokens=False)["input_ids"][:1] for w in variant]
        if all(ids) and len({i[0] for i in ids}) == len(ids):
            return [i[0] for i in ids]
    raise DataError(f"label words {list(words)} do not start with distinct tokens for this "
                    f"tokenizer; choose label words whose first tokens differ")


def encode_task_items(items: list[Item], tokenizer, kind: str, label_words=(),
                      max_length: int = 128, device=None, model=None) -> TaskData:
    """Tokenise ``items`` into one right-padded :class:`TaskData` on ``device`` (``max_length``
    clamped to ``model``'s context, :func:`skilllens.core.batching.clamp_length`)."""
    if not items:
        raise DataError("no items to encode")
    max_length = clamp_length(max_length, model, tokenizer)
    if kind == "classification":
        enc = encode_items([Item(it.id, it.prompt) for it in items], tokenizer, max_length)
    else:
        enc = encode_items(items, tokenizer, max_length)
    ids, att = right_padded([e.ids for e in enc], range(len(enc)), pad_id(tokenizer))
    rows, cols, targets = [], [], []
    for r, (e, it) in enumerate(zip(enc, items)):
        if kind == "classification":
            rows.append(r)
            cols.append(e.prompt_len - 1)
            targets.append(int(it.meta["label"]))
        else:
            if len(e.ids) <= e.prompt_len:
                raise DataError(f"item {it.id!r} has no answer tokens; generation tasks need "
                                f"answers")
            for t in range(e.prompt_len, len(e.ids)):
                rows.append(r)
                cols.append(t - 1)
                targets.append(e.ids[t])
    lab = torch.tensor(label_token_ids(tokenizer, label_words), device=device) \
        if kind == "classification" else None
    as_t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return TaskData(kind, ids.to(device), att.to(device), as_t(rows), as_t(cols), as_t(targets),
                    lab)


# ---------------------------------------------------------------- forward and scoring

def _base_and_head(model: nn.Module):
    from skilllens.core.architectures import site_root

    root = site_root(model)[0]  # a PEFT wrapper's base model (its base_model is the tuner)
    base = root.base_model
    prefix = next(n for n, m in model.named_modules() if m is base)
    head = root.get_output_embeddings()
    if head is None or base is root:
        raise DataError(f"{type(model).__name__} has no separate LM head; grafting tasks need a "
                        f"causal LM (AutoModelForCausalLM)")
    head_name = next(n for n, m in model.named_modules() if m is head)
    return base, prefix, head, head_name


def task_logits(model: nn.Module, data: TaskData, params: dict | None = None) -> torch.Tensor:
    """Logits at the predicting positions: ``[n_pred, n_labels]`` (classification, restricted to
    the label tokens) or ``[n_pred, vocab]``. ``params`` (name -> tensor) replaces parameters
    functionally (differentiable; used by the soft graft). The LM head is applied only where
    needed."""
    base, prefix, head, head_name = _base_and_head(model)
    kwargs = {"input_ids": data.input_ids, "attention_mask": data.attention_mask}
    if params:
        cut = len(prefix) + 1 if prefix else 0
        inner = {k[cut:]: v for k, v in params.items() if k.startswith(prefix)}
        h = torch.func.functional_call(base, inner, args=(), kwargs=kwargs)[0]
        W = params.get(f"{head_name}.weight", head.weight)
    else:
        h = base(**kwargs)[0]
        W = head.weight
    h = h[data.rows, data.cols]
    bias = getattr(head, "bias", None)
    if data.kind == "classification":
        return nn.functional.linear(h, W[data.label_ids],
                                    None if bias is None else bias[data.label_ids])
    return nn.functional.linear(h, W, bias)


def task_loss(model: nn.Module, data: TaskData, params: dict | None = None) -> torch.Tensor:
    """Mean cross-entropy over predicting positions (differentiable)."""
    logits = task_logits(model, data, params)
    return nn.functional.cross_entropy(logits.float(), data.targets)


@dataclass
class TaskScore:
    """Teacher-forced result: ``score`` (accuracy), ``loss`` (mean NLL), ``ece``, counts and
    ``confidence`` (mean top probability; above ``score``: over-confident, below: under-)."""

    score: float
    loss: float
    ece: float
    n_items: int
    n_predictions: int
    confidence: float = float("nan")


@torch.no_grad()
def predictions(model: nn.Module, data: TaskData, batch_size: int = 16,
                params: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(confidence, correct, nll)`` per predicting position (float64, bool, float64)."""
    conf, correct, nll = [], [], []
    for chunk in data.chunks(batch_size):
        logp = torch.log_softmax(task_logits(model, chunk, params).double(), -1)
        top, arg = logp.max(-1)
        conf.append(top.exp())
        correct.append(arg == chunk.targets)
        nll.append(-logp.gather(1, chunk.targets[:, None])[:, 0])
    return torch.cat(conf), torch.cat(correct), torch.cat(nll)


def score_task(model: nn.Module, data: TaskData, batch_size: int = 16,
               params: dict | None = None, n_bins: int = 10) -> TaskScore:
    """Accuracy, mean NLL and expected calibration error of ``model`` on ``data``."""
    from skilllens.grafting.metrics import expected_calibration_error

    from skilllens.core.loaded_model import eval_mode

    with eval_mode(model):  # each module's own train/eval flag comes back afterwards
        conf, correct, nll = predictions(model, data, batch_size, params)
    return TaskScore(float(correct.double().mean()), float(nll.mean()),
                     expected_calibration_error(conf, correct, n_bins), data.n_items,
                     int(conf.numel()), float(conf.mean()))


# ---------------------------------------------------------------- built-in tasks

def _hash01(s: str) -> float:
    return int(hashlib.sha256(s.encode()).hexdigest()[:8], 16) / 16 ** 8


def _snippet(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars].rsplit(" ", 1)[0]
    return cut or text[:max_chars]


def _split_pools(keyed: list[tuple[str, Item]], n_train, n_dev, n_test, seed):
    """Disjoint train/dev/test by hash of the group key; test from its own pool."""
    pool = [it for k, it in keyed if _hash01(k) < 0.6]
    test = [it for k, it in keyed if _hash01(k) >= 0.6]
    rng = random.Random(seed)
    rng.shuffle(pool)
    rng.shuffle(test)
    if len(pool) < n_train + n_dev or len(test) < n_test:
        raise DataError(f"not enough items ({len(pool)} train/dev, {len(test)} test) for "
                        f"n_train={n_train}, n_dev={n_dev}, n_test={n_test}; ask for fewer")
    if all("label" in it.meta for it in pool + test):  # classification: stratify every split
        train, rest = _stratified_take(pool, n_train)
        dev, _ = _stratified_take(rest, n_dev)
        test, _ = _stratified_take(test, n_test)
        return train, dev, test
    return pool[:n_train], pool[n_train:n_train + n_dev], test[:n_test]


def _round_robin(items: list, label_of, n: int | None = None) -> list:
    """Up to ``n`` (default all) of ``items`` taken round-robin over the labels ``label_of(x)``
    (sorted), keeping the given order within each label: as balanced as the rarest label
    allows."""
    by: dict = {}
    for x in items:
        by.setdefault(label_of(x), []).append(x)
    groups = [by[c] for c in sorted(by)]
    n = len(items) if n is None else min(n, len(items))
    taken, i = [], 0
    while len(taken) < n:
        taken += [g[i] for g in groups if i < len(g)][: n - len(taken)]
        i += 1
    return taken


def _stratified_take(items: list[Item], n: int) -> tuple[list[Item], list[Item]]:
    """``n`` items taken round-robin over labels, and the items left over."""
    taken = _round_robin(items, lambda it: it.meta["label"], n)
    ids = {id(it) for it in taken}
    return taken, [it for it in items if id(it) not in ids]


def _data_file(rel: str, data_dir_) -> Path:
    """``rel`` found like every built-in data file (``data_dir=``, ``$SKILLLENS_DATA``, the
    packaged data; see :mod:`skilllens.data`)."""
    found = find_data_file(rel, data_dir_)
    if found is None:
        raise DataError(f"{rel} is in no data folder; pass data_dir= a folder holding it")
    return found[1]


def _read_squad(rel, data_dir_):
    return json.loads(read_text(_data_file(rel, data_dir_)))["data"]


LANG_WORDS = {"en": " English", "de": " German", "es": " Spanish", "vi": " Vietnamese",
              "zh": " Chinese", "ar": " Arabic", "hi": " Hindi"}


def xquad_lang_task(data_dir_=None, langs=("en", "de", "es"), n_train=16, n_dev=8,
                    n_test=64, max_chars=60, seed=0, per_paragraph=1) -> GraftTask:
    """Language identification of XQuAD paragraph snippets (label words = language names).

    Each paragraph is shown in one language (chosen by hash) and split by paragraph into
    train/dev and test; ``per_paragraph`` > 1 cuts that many consecutive snippets of up to
    ``max_chars`` from each paragraph (more held-out items: about 89 test items with 1, 267
    with 3; snippets of one paragraph always share a split)."""
    keyed = []
    for c, lang in enumerate(langs):
        if lang not in LANG_WORDS:
            raise DataError(f"unknown language {lang!r}; use some of {sorted(LANG_WORDS)}")
        for a, article in enumerate(_read_squad(f"xquad/xquad.{lang}.json", data_dir_)):
            for p, para in enumerate(article["paragraphs"]):
                key = f"{a}/{p}"
                # one language per paragraph, chosen by hash, so no translation leaks across splits
                if int(_hash01("lang" + key) * len(langs)) != c:
                    continue
                rest = " ".join(para["context"].split())
                for j in range(max(1, int(per_paragraph))):
                    text = _snippet(rest, max_chars)
                    rest = rest[len(text):].strip()
                    if not text:
                        break
                    iid = f"xquad-lang/{lang}/{key}" + (f"/{j}" if j else "")
                    keyed.append((key, Item(iid, f"Text: {text}\nLanguage:", LANG_WORDS[lang],
                                            {"label": c})))
    keyed = _round_robin(sorted(keyed, key=lambda kv: _hash01(kv[1].id + str(seed))),
                         lambda kv: kv[1].meta["label"])
    train, dev, test = _split_pools(keyed, n_train, n_dev, n_test, seed)
    return GraftTask("xquad-lang", "classification", train, dev, test,
                     tuple(LANG_WORDS[l] for l in langs))


def xquad_numeric_task(data_dir_=None, lang="en", n_train=16, n_dev=8, n_test=64, seed=0,
                       max_chars=100) -> GraftTask:
    """Is the answer to an XQuAD question a number? (label words `` no`` / `` yes``)."""
    keyed = []
    for a, article in enumerate(_read_squad(f"xquad/xquad.{lang}.json", data_dir_)):
        for p, para in enumerate(article["paragraphs"]):
            for qa in para["qas"]:
                ans = qa["answers"][0]["text"]
                label = int(any(ch.isdigit() for ch in ans))
                q = _snippet(" ".join(qa["question"].split()), max_chars)
                keyed.append((f"{a}/{p}", Item(f"xquad-numeric/{qa['id']}",
                                               f"Question: {q}\nIs the answer a number?",
                                               (" no", " yes")[label], {"label": label})))
    keyed = _round_robin(sorted(keyed, key=lambda kv: _hash01(kv[1].id + str(seed))),
                         lambda kv: kv[1].meta["label"])
    train, dev, test = _split_pools(keyed, n_train, n_dev, n_test, seed)
    return GraftTask("xquad-numeric", "classification", train, dev, test, (" no", " yes"))


def gsm8k_calc_task(data_dir_=None, n_train=16, n_dev=8, n_test=64, seed=0,
                    max_question_chars=150, max_step_chars=50) -> GraftTask:
    """First GSM8K solution step with its ``<<a*b=c>>`` annotation, after the question."""
    items = []
    for split in ("train", "test"):
        lines = read_text(_data_file(f"gsm8k/{split}.jsonl", data_dir_)).splitlines()
        for i, line in enumerate(lines):
            row = json.loads(line)
            q = " ".join(row["question"].split())
            step = next((s for s in row["answer"].split("\n") if "<<" in s), None)
            if step is None or len(q) > max_question_chars or len(step) > max_step_chars:
                continue
            items.append((f"{split}/{i}", Item(f"gsm8k-calc/{split}/{i}",
                                               f"Question: {q}\nFirst step:", " " + step)))
    train, dev, test = _split_pools(items, n_train, n_dev, n_test, seed)
    return GraftTask("gsm8k-calc", "generation", train, dev, test)


def synthetic_task(n_train=32, n_dev=16, n_test=32, seed=0, length=6) -> GraftTask:
    """Toy byte-level classification: label ``y`` iff the string holds more ``a`` than ``b``."""
    rng = random.Random(1234 + seed)
    items = []
    while len(items) < n_train + n_dev + n_test:
        s = "".join(rng.choice("ab") for _ in range(length | 1))
        label = int(s.count("a") > s.count("b"))
        items.append(Item(f"synthetic/{len(items)}", f"{s}=", "xy"[label], {"label": label}))
    return GraftTask("synthetic", "classification", items[:n_train],
                     items[n_train:n_train + n_dev], items[n_train + n_dev:], ("x", "y"))


TASKS = {"xquad-lang": xquad_lang_task, "xquad-numeric": xquad_numeric_task,
         "gsm8k-calc": gsm8k_calc_task, "synthetic": synthetic_task}


def build_task(name: str, data_dir_=None, n_train: int = 16, n_dev: int = 8, n_test: int = 64,
               seed: int = 0, **options) -> GraftTask:
    """A built-in task by name (see :data:`TASKS`); ``options`` go to the task's builder (e.g.
    ``per_paragraph=3`` for ``xquad-lang``); the spec is kept for artifact metadata."""
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    kw = dict(n_train=n_train, n_dev=n_dev, n_test=n_test, seed=seed, **options)
    task = TASKS[name](**kw) if name == "synthetic" else TASKS[name](data_dir_, **kw)
    task.spec = {"name": name, **kw}
    return task
