"""Issue 20: skilllens never changes the caller's model or tokenizer, and takes models in the
forms users hold them (bf16, own device, own tokenizer settings, PEFT, torch.compile) or
refuses them up front (accelerate offload). Each test names the defect it pins down."""
import copy
import warnings

import pytest
import torch

import skilllens
from skilllens.core.models import _tiny, copy_model
from skilllens.core.tokenizers import byte_tokenizer, pad_id
from skilllens.errors import ModelSpecError, SiteError

from _snapshot import assert_unchanged, snapshot

TEXTS = ["hello world, skills live in neurons", "2+2=4", "the cat sat on the mat"]


def _pair(dtype=torch.float32):
    return _tiny("tiny-llama").to(dtype), byte_tokenizer()


def _forward_hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ------------------------------------------------------------------ 1. dtype and device
def test_passed_in_model_keeps_dtype_device_and_mode():
    """Defect 1: load_model((model, tok)) cast a bf16 model to float32 and called eval()."""
    model, tok = _pair(torch.bfloat16)
    model.train()
    before = snapshot(model, tok)
    lm = skilllens.load_model((model, tok))
    assert lm.model is model and lm.tokenizer is tok
    assert next(model.parameters()).dtype == torch.bfloat16 and model.training
    assert_unchanged(before, model, tok)


def test_default_device_does_not_move_a_passed_in_model(monkeypatch):
    """Defect 1: device="auto" moved the caller's model to CUDA when one was visible. Pretend
    one is: the old code then called model.to("cuda"); a passed-in model must stay put."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model, tok = _pair()
    before = snapshot(model, tok)
    lm = skilllens.load_model((model, tok))
    assert lm.device == torch.device("cpu")
    assert_unchanged(before, model, tok)


def test_explicit_dtype_and_device_still_cast_a_passed_in_model():
    model, tok = _pair()
    lm = skilllens.load_model((model, tok), dtype="bfloat16", device="cpu")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    assert skilllens.load_model("tiny-llama").model.dtype == torch.float32  # names: float32


def test_bf16_statistics_accumulate_in_float64():
    """A bf16 model collects from its own bf16 activations; the statistics equal a float64
    computation over those activations, and the fp32 model's within bf16 tolerance."""
    model, tok = _pair(torch.bfloat16)
    lm = skilllens.load_model((model, tok))
    assert lm.model.dtype == torch.bfloat16  # statistics of the model the caller chose
    # batch_size=1: no padding, so the reference below runs the very same bf16 forwards
    res = skilllens.collect(lm, TEXTS, sites=["gate", "key"], batch_size=1, progress=False)
    # independent reference: capture the bf16 activations of each text, one at a time
    acts = {"gate": [], "key": []}
    mlp = model.model.layers[1].mlp
    h1 = mlp.gate_proj.register_forward_hook(lambda m, a, o: acts["gate"].append(o[0]))
    h2 = mlp.down_proj.register_forward_pre_hook(lambda m, a: acts["key"].append(a[0][0]))
    with torch.no_grad():
        for t in TEXTS:
            model(**tok(t, return_tensors="pt"))
    h1.remove(), h2.remove()
    for site in ("gate", "key"):
        x = torch.cat(acts[site]).double()
        st = res[site, 1]
        assert st.mean.dtype == torch.float64 and x.dtype == torch.float64
        # blocks are reduced in float32 and merged in float64 (skilllens.stats.partials): far
        # below bf16's rounding (2**-8), which accumulating in the model's dtype would show
        scale = float(x.abs().max())
        torch.testing.assert_close(st.mean, x.mean(0), rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(st.var, x.var(0, unbiased=False), rtol=1e-5,
                                   atol=1e-6 * scale ** 2)
    ref = skilllens.collect(skilllens.load_model("tiny-llama"), TEXTS, sites=["gate"],
                            progress=False)
    torch.testing.assert_close(res["gate", 1].mean, ref["gate", 1].mean, rtol=0.05, atol=0.02)


def test_train_mode_model_is_measured_without_dropout_and_stays_in_train_mode():
    """GPT-2 has dropout 0.1: a caller's model in train mode (load_model no longer calls eval()
    on it) must give the eval-mode statistics, and still be in train mode afterwards."""
    model = _tiny("tiny-gpt2")
    tok = byte_tokenizer()
    ref = skilllens.collect(skilllens.load_model((model, tok)), TEXTS, progress=False)
    model.train()
    before = snapshot(model, tok)
    torch.manual_seed(0)
    got = skilllens.collect(skilllens.load_model((model, tok)), TEXTS, progress=False)
    torch.testing.assert_close(got["gate", 1].mean, ref["gate", 1].mean)
    assert model.training and all(m.training for m in model.modules())
    assert_unchanged(before, model, tok)


def test_interrupt_during_collect_leaves_mode_and_hooks_as_they_were():
    """Ctrl-C in the middle of a collection (here: raised by the caller's own hook on the
    second batch) restores every module's train flag and removes skilllens's hooks."""
    model, tok = _pair()
    model.train()
    calls = []

    def interrupt(mod, args, out):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    model.model.layers[0].register_forward_hook(interrupt)
    before = snapshot(model, tok)
    with pytest.raises(KeyboardInterrupt):
        skilllens.collect((model, tok), TEXTS, batch_size=1, progress=False)
    assert len(calls) == 2
    assert_unchanged(before, model, tok)


# ------------------------------------------------------------------ 2. tokenizer
def test_callers_tokenizer_settings_survive_load_model_and_collect():
    """Defect 2: padding_side was forced to 'right' and a missing pad set to eos, which changed
    the caller's own batched generate."""
    model, tok = _pair()
    tok.padding_side = "left"
    tok.pad_token = None
    assert tok.pad_token_id is None
    before = snapshot(model, tok)
    lm = skilllens.load_model((model, tok))
    skilllens.collect(lm, TEXTS, progress=False)
    assert tok.padding_side == "left" and tok.pad_token is None
    assert_unchanged(before, model, tok)


def test_callers_batched_generate_is_unchanged_by_skilllens():
    model, tok = _pair()
    tok.padding_side = "left"
    tok.pad_token = tok.eos_token
    prompts = ["ab", "a much longer prompt"]

    def gen():
        enc = tok(prompts, return_tensors="pt", padding=True)
        return model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=258)

    first = gen()
    skilllens.collect(skilllens.load_model((model, tok)), TEXTS, progress=False)
    torch.testing.assert_close(gen(), first)


def test_pad_id_reads_pad_then_eos_then_zero_without_setting_anything():
    tok = byte_tokenizer()
    assert pad_id(tok) == tok.pad_token_id == 256
    tok.pad_token = None
    assert pad_id(tok) == tok.eos_token_id == 258 and tok.pad_token is None
    tok.eos_token = None
    assert pad_id(tok) == 0 and tok.eos_token is None


@pytest.mark.parametrize("entry", ["collect", "evaluate", "greedy_generate"])
def test_gpt2_style_tokenizer_without_pad_is_used_as_is(entry):
    """GPT-2's own tokenizer has an EOS but no pad token (the common case the old code "fixed"
    by setting pad = eos on the caller's tokenizer). Tied embeddings, Conv1D and dropout too.
    Results equal those with a pad token: padded positions are masked whatever the pad id."""
    from skilllens.eval.evaluation import evaluate
    from skilllens.eval.generation import greedy_generate
    from skilllens.data import Item

    items = [Item("a", "2+2=", "4"), Item("b", "the cat ", "sat on it")]
    run = {"collect": lambda m, t: skilllens.collect((m, t), TEXTS, sites=["gate"],
                                                     batch_size=2, progress=False).stacked("gate"),
           "evaluate": lambda m, t: torch.tensor(evaluate((m, t), items, "nll", batch_size=2,
                                                          progress=False).score),
           "greedy_generate": lambda m, t: greedy_generate(m, t, ["ab", "a longer one"], 4,
                                                           batch_size=2)}[entry]
    model = _tiny("tiny-gpt2").eval()
    ref = run(model, byte_tokenizer())
    tok = byte_tokenizer()
    tok.pad_token = None
    before = snapshot(model, tok)
    got = run(model, tok)
    assert_unchanged(before, model, tok)
    assert tok.pad_token is None
    if isinstance(ref, torch.Tensor):
        torch.testing.assert_close(got, ref)
    else:
        assert got == ref


# ------------------------------------------------------------------ 4. copies carry no hooks
def test_finetune_inside_applied_leaves_no_hooks_on_the_copy():
    """Defect 4: copy.deepcopy copied the active context's hooks onto ft.model for good."""
    from skilllens.grafting.finetune import FineTuneConfig, finetune
    from skilllens.grafting.tasks import build_task
    from skilllens.unlearning.neuron_adjust import NeuronAdjuster

    lm = skilllens.load_model("tiny-llama")
    na = NeuronAdjuster(percent=20).fit(lm, ["2+2=4", "3*3=9"], ["the cat", "a dog"],
                                        progress=False)
    task = build_task("synthetic", n_train=4, n_dev=2, n_test=4)
    with na.applied(lm):
        assert _forward_hook_count(lm.model) == 2
        ft = finetune(lm, task, FineTuneConfig(steps=1, progress=False))
    assert _forward_hook_count(lm.model) == 0
    assert _forward_hook_count(ft.model) == 0
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(ft.model(ids).logits, ft.model(ids).logits, rtol=0, atol=0)


def test_load_finetuned_and_copy_model_drop_hooks(tmp_path):
    from skilllens.core.hooks import Hook, hooks_applied
    from skilllens.grafting.finetune import FineTuneConfig, finetune, load_finetuned
    from skilllens.grafting.tasks import build_task

    lm = skilllens.load_model("tiny-llama")
    ft = finetune(lm, build_task("synthetic", n_train=4, n_dev=2, n_test=4),
                  FineTuneConfig(steps=1, progress=False))
    ft.save(tmp_path / "ft.safetensors")
    zero = [Hook("key", 0, lambda a: a * 0)]
    with hooks_applied(lm, zero):
        again = load_finetuned(tmp_path / "ft.safetensors", lm)
        plain = copy_model(lm.model)
        leaked = copy.deepcopy(lm.model)  # what the old code did
    assert _forward_hook_count(leaked) == 1  # the mechanism the fix removes
    assert _forward_hook_count(again.model) == 0 and _forward_hook_count(plain) == 0
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, lm.model(ids).logits)
    assert all(a is not b for a, b in zip(plain.parameters(), lm.model.parameters()))


def test_copy_model_shares_tensors_through_memo():
    model = _tiny("tiny-llama")
    h = model.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    memo = {id(p): p for p in model.parameters()}
    view = copy_model(model, memo)
    assert all(a is b for a, b in zip(view.parameters(), model.parameters()))
    assert _forward_hook_count(view) == 0 and _forward_hook_count(model) == 1
    h.remove()


# ------------------------------------------------------------------ 5. offloaded weights
def _offloaded():
    import accelerate

    model, tok = _pair()
    return accelerate.cpu_offload(model, execution_device="cpu"), tok


def test_cpu_offloaded_model_is_refused_by_load_model_with_defaults():
    """Defect 5: the default device moved the model: torch's 'Cannot copy out of meta tensor'."""
    model, tok = _offloaded()
    before = snapshot(model, tok)
    for kw in ({}, {"device": None}, {"device": "cpu", "dtype": "bfloat16"}):
        with pytest.raises(ModelSpecError, match="meta device.*offload"):
            skilllens.load_model((model, tok), **kw)
    with pytest.raises(ModelSpecError, match="meta device"):
        skilllens.collect((model, tok), TEXTS, progress=False)
    assert_unchanged(before, model, tok)


def test_device_map_with_disk_offload_and_empty_weights_are_refused(tmp_path):
    """A device_map that offloads to disk leaves meta parameters behind accelerate's hooks, as
    does init_empty_weights: both refused, by name and as a pair, before any work."""
    import accelerate
    from transformers import AutoModelForCausalLM

    _tiny("tiny-llama").save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    dmap = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "cpu"}
    with pytest.raises(ModelSpecError, match="meta device"):
        skilllens.load_model(str(tmp_path / "m"), device_map=dmap)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        offl = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=dmap,
                                                    offload_folder=str(tmp_path / "off"))
    with pytest.raises(ModelSpecError, match="meta device"):
        skilllens.load_model((offl, byte_tokenizer()))
    with accelerate.init_empty_weights():
        empty = AutoModelForCausalLM.from_config(_tiny("tiny-llama").config)
    with pytest.raises(ModelSpecError, match="never loaded"):
        skilllens.load_model((empty, byte_tokenizer()))


def test_device_map_with_a_passed_in_model_is_refused():
    with pytest.raises(ModelSpecError, match="dispatch it before"):
        skilllens.load_model(_pair(), device_map="auto")


# ------------------------------------------------------------------ other forms
def test_peft_model_sites_are_found_through_the_wrapper():
    """PEFT prefixes module paths with base_model.model.; the adapter looks the blocks up on the
    base model, and hooks fire inside the PeftModel's forward (LoRA on attention)."""
    peft = pytest.importorskip("peft")
    base, tok = _pair()
    ref = skilllens.collect(skilllens.load_model((copy.deepcopy(base), tok)), TEXTS,
                            sites=["gate", "key"], progress=False)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    before = snapshot(pm, tok)
    lm = skilllens.load_model((pm, tok))
    assert lm.adapter.layers_path == "model.layers" and lm.adapter.n_layers == 2
    assert lm.adapter.site_module_path("key", 1)[0] == "base_model.model.model.layers.1.mlp.down_proj"
    res = skilllens.collect(lm, TEXTS, sites=["gate", "key"], progress=False)
    for k in ref.keys():  # LoRA B starts at zero: the wrapper computes the base model
        torch.testing.assert_close(res[k].mean, ref[k].mean)
    assert lm.adapter.final_norm() is base.model.norm
    assert_unchanged(before, pm, tok)


@pytest.mark.parametrize("backend", ["torch", "nnsight", "lens"])
def test_peft_model_with_a_trained_adapter_collects_what_the_merged_model_computes(backend):
    """Non-zero LoRA updates on attention: every backend sees the adapted activations, equal to
    those of an independent merge (merge_and_unload on a copy), and the PeftModel is unchanged.
    (The lens backend built its bridge on the PeftModel itself: AttributeError.)"""
    peft = pytest.importorskip("peft")
    pytest.importorskip({"torch": "torch", "nnsight": "nnsight",
                         "lens": "transformer_lens"}[backend])
    base, tok = _pair()
    unadapted = skilllens.collect((copy.deepcopy(base), tok), TEXTS, sites=["gate"], progress=False)
    pm = peft.get_peft_model(base.eval(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    merged = copy.deepcopy(pm).merge_and_unload()
    ref = skilllens.collect((merged, tok), TEXTS, sites=["gate", "key"], progress=False)
    assert not torch.allclose(ref["gate", 1].mean, unadapted["gate", 1].mean, atol=1e-3)
    before = snapshot(pm, tok)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = skilllens.collect((pm, tok), TEXTS, sites=["gate", "key"], backend=backend,
                                progress=False)
    for k in ref.keys():
        torch.testing.assert_close(res[k].mean, ref[k].mean, rtol=1e-4, atol=1e-5)
    assert_unchanged(before, pm, tok)


def test_peft_adapter_on_the_down_projection_refuses_value_vectors():
    peft = pytest.importorskip("peft")
    base, tok = _pair()
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["down_proj"]))
    lm = skilllens.load_model((pm, tok))
    skilllens.collect(lm, TEXTS, sites=["key"], progress=False)  # activations: fine
    with pytest.raises(SiteError, match="merge_and_unload"):
        lm.adapter.value_vectors(0)


def test_torch_compiled_model_runs_eagerly_on_the_same_weights():
    model, tok = _pair()
    compiled = torch.compile(model, backend="eager")
    before = snapshot(compiled, tok)
    lm = skilllens.load_model((compiled, tok))
    assert lm.model is model
    ref = skilllens.collect(skilllens.load_model((model, tok)), TEXTS, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = skilllens.collect(lm, TEXTS, progress=False)
    torch.testing.assert_close(res["gate", 0].mean, ref["gate", 0].mean)
    assert_unchanged(before, compiled, tok)


# ------------------------------------------------------------------ the checker itself
@pytest.mark.parametrize("change", ["value", "dtype", "replace", "requires_grad", "mode", "hook",
                                    "config", "padding_side", "pad_token", "added_token"])
def test_snapshot_sees_every_kind_of_change(change):
    model, tok = _pair()
    before = snapshot(model, tok)
    p = model.model.layers[0].mlp.down_proj
    if change == "value":
        with torch.no_grad():
            p.weight[0, 0] += 1e-6
    elif change == "dtype":
        p.to(torch.float64)
    elif change == "replace":
        p.weight = torch.nn.Parameter(p.weight.detach().clone())
    elif change == "requires_grad":
        p.weight.requires_grad_(False)
    elif change == "mode":
        model.model.layers[1].train(not model.model.layers[1].training)
    elif change == "hook":
        p.register_forward_pre_hook(lambda m, a: None)
    elif change == "config":
        model.config.use_cache = not model.config.use_cache
    elif change == "padding_side":
        tok.padding_side = "left"
    elif change == "pad_token":
        tok.pad_token = tok.eos_token
    else:
        tok.add_tokens(["<new>"])
    with pytest.raises(AssertionError, match="changed"):
        assert_unchanged(before, model, tok)


def test_evaluate_and_generate_run_without_dropout_and_keep_train_mode():
    """A caller's model left in train mode: evaluate/greedy_generate measure it without
    dropout (equal to the eval-mode model) and hand back train mode afterwards."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import skilllens
    from skilllens.core.tokenizers import byte_tokenizer
    from skilllens.data import Item
    from skilllens.eval.generation import greedy_generate

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.5,
                      max_position_embeddings=256, pad_token_id=256, bos_token_id=257,
                      eos_token_id=258)
    model, tok = LlamaForCausalLM(cfg), byte_tokenizer()
    items = [Item(str(i), f"q{i} is", f" answer number {i}") for i in range(4)]
    model.eval()
    ref = skilllens.evaluate((model, tok), items, progress=False).score
    ref_gen = greedy_generate(model, tok, ["hello", "a b c"], max_new_tokens=6)
    model.train()
    for _ in range(2):
        assert skilllens.evaluate((model, tok), items, progress=False).score == ref
        assert greedy_generate(model, tok, ["hello", "a b c"], max_new_tokens=6) == ref_gen
    assert model.training and all(m.training for m in model.modules())
