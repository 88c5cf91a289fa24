"""LoRA files (native, official import, refusals) and the App. F merge."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from zerase_core.apply import export_lora, host_widths, install_lora
from zerase_core.errors import ZEraseError
from zerase_core.save_names import safe_output_path
from zerase_core.lora_file import ErasureLoRA, check_fits, load_lora, save_lora
from zerase_core.merge import MergeReport, merge, merge_exact, rerank


def _random_lora(keys, d_in=64, d_out=64, rank=4, seed=0, scale=0.5, concept="red"):
    g = torch.Generator().manual_seed(seed)
    factors = {k: (torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g)) for k in keys}
    fingerprint = {"family": "z-image-tiny", "dim": 64, "n_layers": 2}
    return ErasureLoRA(factors, scale=scale, concept=concept, fingerprint=fingerprint)


KEYS = [(0, "q"), (0, "k"), (1, "v")]


def test_save_load_is_exact(tmp_path):
    lora = _random_lora(KEYS)
    path = save_lora(lora, tmp_path / "red.safetensors")
    back = load_lora(path)
    assert back.factors.keys() == lora.factors.keys()
    for k in KEYS:
        assert all(torch.equal(mine, theirs) for mine, theirs in zip(back.factors[k], lora.factors[k]))
    assert (back.scale, back.concept, back.fingerprint) == (lora.scale, lora.concept, lora.fingerprint)
    meta = json.loads(json.dumps(back.metadata()))
    assert meta["gate"]["kind"] == "text-tokens" and meta["targets"] == ["q", "k", "v"]


def test_official_file_imports_to_same_delta(tmp_path):
    g = torch.Generator().manual_seed(3)
    tensors, expected = {}, {}
    for layer in (0, 1):
        for proj in ("q", "k"):
            down, up = torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g)
            tensors[f"layers.{layer}.attention.to_{proj}.lora_down.weight"] = down
            tensors[f"layers.{layer}.attention.to_{proj}.lora_up.weight"] = up
            expected[(layer, proj)] = up.double() @ down.double()
    save_file(tensors, str(tmp_path / "official.safetensors"))
    lora = load_lora(tmp_path / "official.safetensors")
    assert lora.source == "official-z-erase" and lora.targets == ("q", "k")
    for key, delta in expected.items():
        assert torch.allclose(lora.delta_weight(key), delta, atol=1e-9)
    save_file({k: v[:3] if k.endswith("lora_down.weight") else v for k, v in tensors.items()},
              str(tmp_path / "official_cut.safetensors"))  # factors of no one shape: told with the file's name
    with pytest.raises(ZEraseError, match="'official_cut.safetensors' has the official Z-Erase code's layout but "
                                          "cannot be used: LoRA factors for layer"):
        load_lora(tmp_path / "official_cut.safetensors")
    twice = tensors | {"transformer.layers.0.attention.to_q.lora_down.weight": torch.zeros(4, 64)}
    save_file(twice, str(tmp_path / "official_twice.safetensors"))  # two names of one factor: one was read over
    with pytest.raises(ZEraseError, match="'official_twice.safetensors' has the official .* cannot be used: The file "
                                          "holds layer 0 q's down twice"):
        load_lora(tmp_path / "official_twice.safetensors")
    far = {k.replace("layers.1.", f"layers.{'9' * 5000}."): v for k, v in tensors.items()}  # int() could not read it
    save_file(far, str(tmp_path / "official_far.safetensors"))
    with pytest.raises(ZEraseError, match="'official_far.safetensors' has the official .* cannot be used: The file has "
                                          "a tensor 'layers.99999.*whose layer index is not a plain number"):
        load_lora(tmp_path / "official_far.safetensors")
    tensors["layers.1.attention.to_k.lora_down.weight"][0, 0] = float("inf")  # as native files, refused by name
    save_file(tensors, str(tmp_path / "official_inf.safetensors"))
    with pytest.raises(ZEraseError, match="'official_inf.safetensors' contains NaN or infinite weights"):
        load_lora(tmp_path / "official_inf.safetensors")
    tensors["layers.1.attention.to_k.lora_down.weight"] = torch.full((4, 64), 1e300, dtype=torch.float64)
    save_file(tensors, str(tmp_path / "official_f64.safetensors"))  # finite in the file, inf in float32
    with pytest.raises(ZEraseError, match="'official_f64.safetensors' contains NaN or infinite weights"):
        load_lora(tmp_path / "official_f64.safetensors")


def test_official_files_are_known_by_their_file_name_and_a_merge_warns_of_their_scale(tmp_path, caplog):
    """An official file names no concept: merges of such files were named "red + " or " + ". Its code applies it at
    a strength of about 15, which a merge at weight × 1 would drop without a word."""
    for name, seed in (("nudity", 0), ("violence", 1)):
        g = torch.Generator().manual_seed(seed)
        down, up = torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g)
        save_file({"layers.0.attention.to_q.lora_down.weight": down, "layers.0.attention.to_q.lora_up.weight": up},
                  str(tmp_path / f"{name}.safetensors"))
    loras = [load_lora(tmp_path / f"{name}.safetensors") for name in ("nudity", "violence")]
    assert [lora.concept for lora in loras] == ["nudity", "violence"]
    with caplog.at_level("INFO", logger="zerase_core.merge"):
        merged = merge_exact(loras)
    assert merged.concept == "nudity + violence" and merged.training["merged_from"] == ["nudity", "violence"]
    assert caplog.text.count("is an official Z-Erase file, which its code applies at a strength of about 15") == 2
    assert "Merge weights 1/2 each, the paper's blend" in caplog.text  # told when the defaults are taken
    caplog.clear()
    with caplog.at_level("INFO", logger="zerase_core.merge"):
        merge_exact([_random_lora(KEYS, seed=0), _random_lora(KEYS, seed=1, concept="dog")], [1.0, 1.0])
    assert caplog.text == ""  # native parts, weights given: nothing to say


def test_a_training_checkpoint_given_as_a_lora_is_named_as_one(tmp_path):
    from zerase_core.config import TrainConfig
    from zerase_core.lora import LoRAConfig
    from zerase_core.tiny import tiny_zimage_backend
    from zerase_core.trainer import ZEraseTrainer

    config = TrainConfig(concept="red", templates=("a photo of a {} ball",), steps=1, height=64, width=64,
                         sample_steps=2, xt_pool=1, lora=LoRAConfig(rank=2))
    ZEraseTrainer(tiny_zimage_backend(), config, checkpoint_path=tmp_path / "checkpoint.safetensors").run()
    with pytest.raises(ZEraseError, match="training checkpoint .* use the run.s LoRA file .erasure_lora.safetensors"):
        load_lora(tmp_path / "checkpoint.safetensors")


def test_installed_lora_round_trips_through_backend(tiny_backend, tmp_path):
    lora = _random_lora(KEYS)
    lora_set = install_lora(tiny_backend, lora)
    again = export_lora(lora_set)
    for key in KEYS:
        assert torch.allclose(again.delta_weight(key), lora.delta_weight(key), atol=1e-6)
    assert torch.equal(again.delta_weight((1, "q")), torch.zeros(64, 64, dtype=torch.float64))


def test_an_ungated_lora_says_so_and_is_neither_applied_nor_merged(tiny_backend, tmp_path):
    """The §3 ablation (scope 'all') exported, saved and loaded stays marked ungated: no host applies it gated."""
    from zerase_core.lora import LoRAConfig

    lora_set = tiny_backend.install(LoRAConfig(rank=4, scope="all"), "ablation")
    ungated = load_lora(save_lora(export_lora(lora_set, concept="red"), tmp_path / "all.safetensors"))
    tiny_backend.uninstall()
    assert ungated.scope == "all" and ungated.metadata()["gate"]["kind"] == "all-tokens"
    assert ungated.metadata()["format_version"] == 2  # a reader from before the gate field refuses it
    with pytest.raises(ZEraseError, match="without the token gate"):
        install_lora(tiny_backend, ungated)
    with pytest.raises(ZEraseError, match="without the token gate"):
        merge([_random_lora(KEYS), ungated])
    gated = load_lora(save_lora(_random_lora(KEYS), tmp_path / "gated.safetensors"))
    assert gated.scope == "text" and gated.metadata()["format_version"] == 1  # as every earlier version wrote


def test_refusals(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{notjson")
    with pytest.raises(ZEraseError, match="not a readable safetensors"):
        load_lora(tmp_path / "broken.safetensors")
    stock = {"transformer.layers.0.attention.to_q.lora_A.weight": torch.zeros(2, 4)}
    save_file(stock, str(tmp_path / "stock.safetensors"))
    with pytest.raises(ZEraseError, match="ordinary LoRA"):
        load_lora(tmp_path / "stock.safetensors")
    with pytest.raises(ZEraseError, match="not found"):
        load_lora(tmp_path / "missing.safetensors")
    with pytest.raises(ZEraseError, match="is a folder; give the LoRA file in it"):
        load_lora(tmp_path)


def test_a_file_holding_no_tensors_is_told_as_no_z_erase_lora(tmp_path):
    """An empty safetensors file (no tensors, no metadata) has no layout at all: told as not a Z-Erase LoRA, not as a
    file of the official code's layout to export again from it."""
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(ZEraseError, match="'empty.safetensors' is not a Z-Erase LoRA \\(no Z-Erase metadata"):
        load_lora(tmp_path / "empty.safetensors")


def test_a_damaged_file_with_its_suffix_in_capitals_is_told_damaged_not_another_format(tmp_path):
    """"LORA.SAFETENSORS" (a copy from Windows, which keeps names as typed) is a safetensors file: damaged, it is told
    damaged, not sent to look for a .safetensors file it already is; a .ckpt is told it is another format."""
    header = b"\x08\x00\x00\x00\x00\x00\x00\x00{notjson"
    (tmp_path / "broken.SAFETENSORS").write_bytes(header)
    with pytest.raises(ZEraseError, match="'broken.SAFETENSORS' is not a readable safetensors file"):
        load_lora(tmp_path / "broken.SAFETENSORS")
    (tmp_path / "broken.ckpt").write_bytes(header)
    with pytest.raises(ZEraseError, match="'broken.ckpt' is not a safetensors file"):
        load_lora(tmp_path / "broken.ckpt")


def test_a_refused_file_is_refused_from_its_header_without_loading_its_tensors(tmp_path, monkeypatch):
    """An ordinary LoRA (or a whole model picked by mistake) can be gigabytes: its names decide, not its tensors."""
    from contextlib import contextmanager

    import zerase_core.lora_file as lora_file

    real, loaded = lora_file.safe_open, []

    class Counting:  # an open safetensors file that lists the tensors read from it
        def __init__(self, f):
            self.f = f

        def get_tensor(self, name):
            loaded.append(name)
            return self.f.get_tensor(name)

        def __getattr__(self, name):
            return getattr(self.f, name)

    @contextmanager
    def counting_open(*args, **kwargs):
        with real(*args, **kwargs) as f:
            yield Counting(f)

    monkeypatch.setattr(lora_file, "safe_open", counting_open)
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 4)}, str(tmp_path / "stock.safetensors"))
    with pytest.raises(ZEraseError, match="ordinary LoRA"):
        load_lora(tmp_path / "stock.safetensors")
    save_file({"model.big": torch.zeros(64, 64)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ZEraseError, match="not a Z-Erase LoRA"):
        load_lora(tmp_path / "model.safetensors")
    assert loaded == []
    load_lora(save_lora(_random_lora(KEYS), tmp_path / "mine.safetensors"))
    assert len(loaded) == 2 * len(KEYS)  # the counting sees reads: a native file's factors are read


def _damaged(lora: ErasureLoRA, tensors=None, **meta) -> tuple[dict, dict]:
    """A native file's tensors and metadata (as stored: strings), changed by ``tensors`` / ``meta``."""
    stored = {f"zerase.layers.{i}.{p}.{ab}": t for (i, p), pair in lora.factors.items() for ab, t in zip("AB", pair)}
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in lora.metadata().items()}
    return (tensors(stored) if tensors else stored), {k: v for k, v in (metadata | meta).items() if v is not None}


@pytest.mark.parametrize("damage, message", [
    (dict(tensors=lambda t: t | {"zerase.extra": torch.zeros(1)}), "unexpected tensor 'zerase.extra'"),
    (dict(tensors=lambda t: {k: v for k, v in t.items() if k != "zerase.layers.0.q.B"}), "misses half"),
    # one factor under a second name, read over the first or taken for another layer; an index int() cannot read
    (dict(tensors=lambda t: t | {"zerase.layers.00.q.A": torch.zeros(4, 64),
                                 "zerase.layers.00.q.B": torch.zeros(64, 4)}),
     "'bad.safetensors' has a tensor 'zerase.layers.00.q.A' whose layer index is not a plain number .no leading "
     "zero, at most 4 digits.; the file is damaged"),
    (dict(tensors=lambda t: t | {"zerase.layers.0.q.A\n": torch.zeros(4, 64)}), "unexpected tensor"),
    (dict(tensors=lambda t: {k.replace(".1.", ".\u0661."): v for k, v in t.items()}), "unexpected tensor"),
    (dict(tensors=lambda t: {k.replace(".1.", f".{'9' * 5000}."): v for k, v in t.items()}),
     "layer index is not a plain number"),
    (dict(tensors=lambda t: t | {"zerase.layers.0.q.A": torch.full_like(t["zerase.layers.0.q.A"], float("nan"))}),
     "NaN or infinite"),
    (dict(tensors=lambda t: t | {"zerase.layers.0.q.B": torch.zeros(64, 3)}), "'bad.safetensors': .*inconsistent"),
    # each factor finite, ΔW = scale · strength · B A past float32 (a review: `measure` ended in a linalg traceback)
    (dict(tensors=lambda t: t | {"zerase.layers.0.q.A": t["zerase.layers.0.q.A"].index_fill(1, torch.tensor([0]),
                                                                                           3e38)}),
     r"'bad.safetensors': .*change to layer 0 q \(ΔW = scale · strength · B A\) leaves float32's range"),
    (dict(tensors=lambda t: t | {"zerase.layers.0.q.A": torch.zeros(0, 64), "zerase.layers.0.q.B": torch.zeros(64, 0)}),
     r"'bad.safetensors': .*A \(0, 64\), B \(64, 0\)"),  # rank 0: refused by the file's name, not at install
    # width 0: no bytes in the file, and a merge wrote it as rank 2**40
    (dict(tensors=lambda t: t | {"zerase.layers.0.q.A": torch.zeros(2**40, 0), "zerase.layers.0.q.B":
                                 torch.zeros(0, 2**40)}, rank=str(2**40)),
     r"'bad.safetensors': .*A \(1099511627776, 0\)"),
    (dict(tensors=lambda t: t | {"zerase.layers.0.q.A": t["zerase.layers.0.q.B"], "zerase.layers.0.q.B":
                                 t["zerase.layers.0.q.A"]}),  # on a square projection they fit, at rank 64
     "'bad.safetensors': its factors have rank 64 where the file records rank 4 .A and B swapped"),
    (dict(format_version="99"), "format version 99; update"),
    (dict(format_version="99", scale=None), "format version 99; update"),  # a newer format may lack our keys
    (dict(format_version="two"), "damaged Z-Erase metadata"),
    (dict(scale=None), "damaged Z-Erase metadata"),
    (dict(scale='"half"'), "damaged Z-Erase metadata"),
    (dict(preserve="7"), "damaged Z-Erase metadata"),
    (dict(scale="NaN"), "damaged Z-Erase metadata"),  # would load and turn every prediction into NaN
    (dict(strength="Infinity"), "damaged Z-Erase metadata"),
    (dict(strength="1e39"), "damaged Z-Erase metadata"),  # finite in the file, inf in the float32 model
    (dict(preserve="[1, 2]"), "damaged Z-Erase metadata .*expected a list of strings"),
    (dict(preserve="dog"), "damaged Z-Erase metadata .*expected a list of strings"),  # was read as ('d', 'o', 'g')
    (dict(gate='{"kind": "image-tokens"}'), "damaged Z-Erase metadata"),  # no scope writes this
    # in a version that may add gate kinds: one added later than this pack
    (dict(format_version="2", gate='{"kind": "image-tokens"}'), "gate of kind 'image-tokens'.*update the Z-Erase"),
    # ≤ 0 strengthens its concept: Apply refused it as "alpha", Load and Merge took it
    (dict(scale="0"), "'bad.safetensors': .*scale must be > 0 .*got 0[.] The file is damaged"),
    (dict(scale="-5"), "'bad.safetensors': .*scale must be > 0 .*got -5[.] The file is damaged"),
    (dict(strength="-1"), "'bad.safetensors': .*strength must be > 0 and at most 20; got -1[.] .*The file is damaged"),
    (dict(strength="0"), "'bad.safetensors': .*strength must be > 0 and at most 20; got 0[.] .*The file is damaged"),
    (dict(format="zerase-gated-lora-v2"), "metadata of format 'zerase-gated-lora-v2', where this pack reads .*update"),
    # no trained weight is an integer or a boolean: they were cast to float32 and applied
    (dict(tensors=lambda t: t | {"zerase.layers.0.k.A": t["zerase.layers.0.k.A"].to(torch.int8)}),
     "'bad.safetensors' holds zerase.layers.0.k.A as torch.int8, not as floating point weights; the file is damaged"),
    (dict(tensors=lambda t: t | {"zerase.layers.0.q.B": t["zerase.layers.0.q.B"] > 0}), "as torch.bool, not as float"),
    # a float type torch cannot convert to float32 (4-bit, two to a byte): a NotImplementedError traceback (a review)
    (dict(tensors=lambda t: t | {"zerase.layers.0.k.A": torch.zeros(t["zerase.layers.0.k.A"].shape,
                                                                    dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}),
     "holds zerase.layers.0.k.A as torch.float4_e2m1fn_x2, which cannot be read as float32 weights"),
    # training refuses a non-finite loss, so a recorded NaN is an edit (inspect printed it as invalid JSON)
    (dict(history='{"L_erase": [0.5, NaN]}'), "damaged Z-Erase metadata .*history values must be finite, got .nan"),
    # past the JSON parser's limits (shared files are untrusted): a RecursionError and a ValueError traceback
    (dict(training="[" * 100_000 + "]" * 100_000), "damaged Z-Erase metadata"),
    (dict(training="1" * 5000), "damaged Z-Erase metadata"),
    # merge compares and sorts the parts' base digests: a list, an int or a dict there was a traceback
    *[(dict(training=json.dumps({"base": base})), "damaged Z-Erase metadata .*training.base must be a string")
      for base in ([1, 2], 5, {"a": 1})],
    # a list of pairs, which dict() took: read_description then returned the list, and Train's lookup of a finished
    # run failed on it (AttributeError)
    (dict(training='[["steps_done", 3]]'), "damaged Z-Erase metadata .*training must be a JSON object, got list"),
    (dict(fingerprint='[["dim", 64]]'), "damaged Z-Erase metadata .*fingerprint must be a JSON object, got list"),
    (dict(history='[["L_erase", [0.5]]]'), "damaged Z-Erase metadata .*history must be a JSON object, got list"),
    # hand-edited values of another type were taken (true as scale 1.0, a string curve letter by letter, an object
    # concept as its repr) or printed by inspect as invalid JSON (NaN, Infinity) (a review)
    (dict(scale="true"), "damaged Z-Erase metadata .*scale must be a number, got True"),
    (dict(strength='"2"'), "damaged Z-Erase metadata .*strength must be a number, got '2'"),
    (dict(concept='{"a": 1}'), "damaged Z-Erase metadata .*concept must be a string"),
    (dict(history='{"L_erase": "123"}'), "damaged Z-Erase metadata .*history values must be lists of numbers"),
    (dict(history='{"L_erase": {"1": 2}}'), "damaged Z-Erase metadata .*history values must be lists of numbers"),
    (dict(training='{"lr": NaN}'), "damaged Z-Erase metadata .*training holds nan, not a finite number"),
    (dict(fingerprint='{"dim": Infinity}'), "damaged Z-Erase metadata .*fingerprint holds inf, not a finite number"),
    # the source is a string as the concept is (an object was kept as its repr, which inspect printed and merge wrote
    # on), and a NaN nested in a list of the training record is as invalid JSON for inspect as one at its top
    (dict(source='{"a": 1}'), "damaged Z-Erase metadata .*source must be a string, got \\{'a': 1\\}"),
    (dict(training='{"losses": [0.5, NaN]}'), "damaged Z-Erase metadata .*training holds nan, not a finite number"),
    # integers JSON reads, past float's range: an OverflowError traceback
    (dict(scale="1" + "0" * 400), "damaged Z-Erase metadata .*OverflowError"),
    (dict(history='{"L_erase": [1' + "0" * 400 + "]}"), "damaged Z-Erase metadata .*OverflowError"),
])
def test_damaged_native_files_are_refused_by_name(tmp_path, damage, message):
    tensors, meta = _damaged(_random_lora(KEYS), **damage)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ZEraseError, match=message):
        load_lora(tmp_path / "bad.safetensors")


def test_the_first_format_version_past_this_packs_is_refused_as_newer(tmp_path):
    """Version 3, the next one a later pack writes, is as unreadable here as 99: told to update the pack, not read
    as if it were version 2 (a newer format may mean what the same fields say differently)."""
    from zerase_core.lora_file import FORMAT_VERSION, read_description

    tensors, meta = _damaged(_random_lora(KEYS), format_version=str(FORMAT_VERSION + 1))
    save_file(tensors, str(tmp_path / "newer.safetensors"), metadata=meta)
    with pytest.raises(ZEraseError, match=f"format version {FORMAT_VERSION + 1}; update the Z-Erase pack"):
        load_lora(tmp_path / "newer.safetensors")
    assert read_description(tmp_path / "newer.safetensors") == {}


@pytest.mark.skipif(os.name == "nt", reason="symbolic links need privileges on Windows")
def test_a_link_to_nothing_where_a_folder_is_to_be_made_is_refused_before_any_work(tmp_path):
    """A dangling link named as a folder of the output path passed the check (it followed the link and found
    nothing); the save after the training then could not make the folder there, and the run's work was lost."""
    from zerase_core.files import check_writable

    (tmp_path / "runs").symlink_to(tmp_path / "gone")
    with pytest.raises(ZEraseError, match="runs is a file, where a folder is needed"):
        check_writable(tmp_path / "runs" / "red.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_a_file_whose_training_is_no_object_describes_no_run(tmp_path):
    """Train looks for a finished run among the files under its save name by their description; one whose training
    record was a list of pairs was described as that list, and the lookup stopped with an AttributeError."""
    from zerase_core.lora_file import read_description

    for damage in (dict(training='[["steps_done", 3]]'), dict(fingerprint='[["dim", 64]]')):
        tensors, meta = _damaged(_random_lora(KEYS), **damage)
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
        assert read_description(tmp_path / "bad.safetensors") == {}


def test_a_file_of_another_format_describes_no_run(tmp_path):
    """Train takes a finished run under its save name by the file's description: a file whose metadata names another
    format (a later version's, a tool's), however like ours the rest is, describes none; it would be taken as the
    finished run and then refused when loaded."""
    from zerase_core.lora_file import read_description

    for other in ("zerase-gated-lora-v3", None):
        tensors, meta = _damaged(_random_lora(KEYS), format=other)
        save_file(tensors, str(tmp_path / "other.safetensors"), metadata=meta)
        assert read_description(tmp_path / "other.safetensors") == {}
        with pytest.raises(ZEraseError, match="update the Z-Erase pack|without its metadata"):
            load_lora(tmp_path / "other.safetensors")


def test_text_from_a_file_reaches_messages_with_its_control_characters_escaped(tmp_path, capsys, tiny_backend):
    """Files are shared: a concept's escape codes cleared the terminal that merge printed its refusal to, set its
    title, and its line break printed a line of its own ("Done: merged OK")."""
    from zerase_core.cli import main

    hostile = "x\x1b[2J\x1b]0;pwned\x07\nDone: merged OK"
    ungated = replace(_random_lora(KEYS, concept=hostile), scope="all")
    parts = [save_lora(ungated, tmp_path / "a.safetensors"), save_lora(_random_lora(KEYS), tmp_path / "b.safetensors")]
    assert main(["merge", *map(str, parts), "--out", str(tmp_path / "merged.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "for 'x\\x1b[2J\\x1b]0;pwned\\x07\\nDone: merged OK' was trained without the token gate" in err
    assert "\x1b" not in err and "\x07" not in err and err.count("\n") == 1  # the one line the refusal is
    tensors, meta = _damaged(_random_lora(KEYS), tensors=lambda t: t | {"zerase.\x1b[2J": torch.zeros(1)})
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ZEraseError, match=r"unexpected tensor 'zerase.\\x1b\[2J'; the file is damaged"):
        load_lora(tmp_path / "bad.safetensors")
    other = replace(_random_lora(KEYS), fingerprint=tiny_backend.fingerprint() | {"family": "z\x1b[2J" + "!" * 300})
    with pytest.raises(ZEraseError) as refused:
        check_fits(other, tiny_backend.fingerprint(), host_widths(tiny_backend))
    assert "family: LoRA z\\x1b[2J!!" in str(refused.value) and "\x1b" not in str(refused.value)
    assert "!" * 201 not in str(refused.value)  # cut: a value of megabytes was a message of megabytes
    # a review found three more: an integer tensor's name, the keys two merged files' fingerprints differ in
    tensors, meta = _damaged(_random_lora(KEYS), tensors=lambda t: t | {"zerase.\x1b[2J": torch.zeros(1, dtype=int)})
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ZEraseError, match=r"holds zerase.\\x1b\[2J as torch.int64"):
        load_lora(tmp_path / "bad.safetensors")
    clashing = [replace(_random_lora(KEYS, seed=i), fingerprint={"k\x1b[2J": i}) for i in (0, 1)]
    with pytest.raises(ZEraseError, match=r"differ in k\\x1b\[2J\)"):
        merge_exact(clashing)


def test_inspect_prints_the_metadata_as_stored(tmp_path, capsys):
    """A file from before format_version and gate were recorded: inspect printed the metadata rebuilt on loading
    (format_version 1, the gate), which the file does not hold."""
    from zerase_core.cli import main

    tensors, meta = _damaged(_random_lora(KEYS), format_version=None, gate=None)
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    assert main(["inspect", str(tmp_path / "old.safetensors")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert "format_version" not in shown and "gate" not in shown
    assert shown["concept"] == "red" and shown["rank"] == 4 and shown["scale"] == 0.5
    assert load_lora(tmp_path / "old.safetensors").metadata()["format_version"] == 1  # what it is read as


@pytest.mark.parametrize("stdout", ["closed pipe", "full disk"])
def test_inspect_into_a_closed_pipe_or_a_full_disk_ends_without_a_traceback(tmp_path, stdout):
    """`inspect FILE | head -1` (the reader gone before the JSON is out) and `> /dev/full` ended in a traceback.
    A closed pipe now stops quietly with the shell's code for SIGPIPE; a full disk is told in one line."""
    import subprocess
    import sys
    from pathlib import Path

    if stdout == "full disk" and not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system (Linux has one)")
    save_lora(_random_lora(KEYS), tmp_path / "a.safetensors")
    command = [sys.executable, "-m", "zerase_core", "inspect", str(tmp_path / "a.safetensors")]
    root = Path(__file__).parents[1]
    if stdout == "closed pipe":
        run = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        run.stdout.close()  # before it prints: every write meets a closed pipe
        code, err = run.wait(timeout=120), run.stderr.read().decode()
        assert (code, err) == (141, "")
    else:
        with open("/dev/full", "w") as full:
            done = subprocess.run(command, cwd=root, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr == "error: Could not print the result: No space left on device. Every file the command " \
                              "writes (a LoRA, a merge, a report, a benchmark's --out) is written: only this result " \
                              "line is lost, and running the command again is not needed for them.\n"


def test_a_second_lora_under_a_name_already_installed_is_refused_and_the_first_stays(tiny_backend):
    """Two LoRAs applied add up, each under its own name; the default name twice replaced the first, silently."""
    from zerase_core.lora import GatedLoRALinear

    def in_the_model(name):  # the adapters the model's layers run under that name
        return [m.adapters[name] for m in tiny_backend.transformer.modules()
                if isinstance(m, GatedLoRALinear) and name in m.adapters]

    def gated_layers():
        return [m for m in tiny_backend.transformer.modules() if isinstance(m, GatedLoRALinear)]

    first = _random_lora([(0, "q")], seed=1)
    installed = set(map(id, install_lora(tiny_backend, first).slots.values()))
    layers = gated_layers()
    elsewhere = _random_lora([(1, "q")], seed=3)  # on a layer of its own
    for second in (_random_lora([(0, "q"), (1, "q")], seed=2), elsewhere):
        with pytest.raises(ZEraseError, match="A LoRA named 'erasure' is already installed on this model"):
            install_lora(tiny_backend, second)  # a layer: the name is the model's
        assert set(map(id, in_the_model("erasure"))) == installed and gated_layers() == layers  # nothing left behind
    assert install_lora(tiny_backend, elsewhere, name="another").factors().keys() == {(1, "q")}
    assert len(in_the_model("another")) == 1 and set(map(id, in_the_model("erasure"))) == installed


def test_a_native_file_stripped_of_its_metadata_is_told_as_such(tmp_path):
    """It was called "no Z-Erase metadata and no known key layout", though its keys are the native layout."""
    from safetensors.torch import load_file

    save_file(load_file(save_lora(_random_lora(KEYS), tmp_path / "a.safetensors")), str(tmp_path / "bare.safetensors"))
    with pytest.raises(ZEraseError, match="'bare.safetensors' holds a Z-Erase LoRA's tensors without its metadata"):
        load_lora(tmp_path / "bare.safetensors")


def test_a_file_that_is_no_lora_or_no_safetensors_says_which_file_to_choose(tmp_path):
    """A model checkpoint got "not a Z-Erase LoRA" with no next step; a whole .pt LoRA was called damaged."""
    save_file({"model.diffusion_model.x.weight": torch.zeros(2)}, str(tmp_path / "ckpt.safetensors"))
    with pytest.raises(ZEraseError, match="'ckpt.safetensors' is not a Z-Erase LoRA .*: choose a LoRA saved by Z-Erase "
                                          "Train or Merge"):
        load_lora(tmp_path / "ckpt.safetensors")
    torch.save({"lora_up.weight": torch.zeros(2)}, tmp_path / "old.pt")
    with pytest.raises(ZEraseError, match="'old.pt' is not a safetensors file; Z-Erase LoRAs are .safetensors files"):
        load_lora(tmp_path / "old.pt")


def test_a_merge_keeps_the_base_its_parts_share_and_warns_when_they_differ(caplog):
    """The base digest was dropped by a merge; LoRAs of one architecture trained on different bases merged silently."""
    def trained_on(base, seed):
        return replace(_random_lora(KEYS, seed=seed), training={"base": base})

    assert merge_exact([trained_on("aaa", 1), trained_on("aaa", 2)]).training["base"] == "aaa"
    with caplog.at_level("WARNING", logger="zerase_core.merge"):
        merged = merge_exact([trained_on("aaa", 1), trained_on("bbb", 2)])
    assert "base" not in merged.training and "different base models (digests aaa, bbb)" in caplog.text
    assert "base" not in merge_exact([trained_on("aaa", 1), _random_lora(KEYS, seed=2)]).training  # one unknown


def test_metadata_reads_back_as_written_even_strings_that_look_like_json(tmp_path):
    """A concept "null" or "3.50", or a model digest of digits only (checkpoints compare it on resume), read back as
    the strings they were, not as None, 3.5 or an int; other values as the JSON they were stored as."""
    from zerase_core.files import atomic_save, decode_metadata
    from safetensors import safe_open

    given = {"concept": "null", "number": "3.50", "digest": "8301945672103958", "word": "cat", "quoted": '"x"',
             "list": ["a", 1], "steps": 4, "none": None,
             "deep": "[" * 100_000, "digits": "1" * 5000}  # past the parser's limits: text, not a traceback
    path = atomic_save({"t": torch.zeros(1)}, tmp_path / "m.safetensors", given)
    with safe_open(str(path), framework="pt") as f:
        stored = f.metadata()
    assert decode_metadata(stored) == given
    assert stored["word"] == "cat"  # plain text stays readable to other tools


def test_a_checkpoint_written_before_quoting_keeps_its_digest_as_text(tmp_path):
    """Checkpoints once stored a digest unquoted: "8301945672103958" and "1234e56789012345" read back as numbers (the
    second as inf) and never matched the model again. Their text is the digest."""
    from safetensors.torch import save_file

    from zerase_core.checkpoint import _read

    for digest in ("8301945672103958", "1234e56789012345", "3f9a0c11d2e4b5a6"):
        save_file({"t": torch.zeros(1)}, str(tmp_path / "old.ckpt"), metadata={"base": digest, "step": "2"})
        assert _read(tmp_path / "old.ckpt", tensors=False)[1]["base"] == digest


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    """A real write failure (the file-size limit, as a full disk fails): a message naming the file, the old file
    intact, no temporary left. Python ignores SIGXFSZ, so the write fails with EFBIG instead of killing us."""
    resource = pytest.importorskip("resource")  # POSIX only

    path = save_lora(_random_lora(KEYS), tmp_path / "red.safetensors")
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, hard))
    try:
        with pytest.raises(ZEraseError, match="Could not write .*red.safetensors: File too large. Free disk space"):
            save_lora(_random_lora(KEYS, seed=1), path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["red.safetensors"]


def test_a_file_that_could_not_be_written_is_refused_before_any_work(tmp_path):
    """A name the file system cannot hold and a folder that cannot be made are told before training, not at its
    first save; the longest name that fits is written (the temporary's name does not grow with it)."""
    from zerase_core.files import NAME_MAX, check_writable

    longest = "y" * (NAME_MAX - len(".safetensors"))
    check_writable(tmp_path / f"{longest}.safetensors")
    save_lora(_random_lora(KEYS), tmp_path / f"{longest}.safetensors")
    with pytest.raises(ZEraseError, match="too long .*choose a shorter name"):
        check_writable(tmp_path / f"{longest}y.safetensors")
    (tmp_path / "taken").write_bytes(b"a file, not a folder")
    with pytest.raises(ZEraseError, match="taken is a file, where a folder is needed"):
        check_writable(tmp_path / "taken" / "sub" / "red.safetensors")
    with pytest.raises(ZEraseError, match=f"The name '{'z' * 256}' is too long"):  # a folder still to be made
        check_writable(tmp_path / ("z" * 256) / "red.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{longest}.safetensors", "taken"])  # no probe left


def test_the_files_check_leaves_the_folders_as_it_found_them(tmp_path):
    """It probes the deepest folder that exists: folders still to be made are not made (a run refused later left
    them empty), and an empty folder that was there (a user's --out, ComfyUI's loras/zerase/) stays."""
    from zerase_core.files import check_writable

    check_writable(tmp_path / "new" / "deeper" / "red.safetensors")
    (tmp_path / "empty").mkdir()
    check_writable(tmp_path / "empty" / "red.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["empty"] and not any((tmp_path / "empty").iterdir())


@pytest.mark.parametrize("name, why", [("nul", "device name on Windows \\(NUL\\)"), ("sub/aux.x", "device name"),
                                       ("COM1/cat", "device name"), ("lpt²", "device name"),
                                       ("cat./red", "ends in a dot"), ("cat /red", "ends in a space")])
def test_names_windows_cannot_hold_are_refused_everywhere(name, why, tmp_path):
    """A LoRA saved as nul.safetensors on Windows goes to the null device, without an error; a folder 'cat.' is
    'cat' there. A save name (shared in workflows) and a folder still to be made are refused on every system, before
    any work; the same names inside other words, and existing folders, are fine."""
    from zerase_core.files import check_writable
    from zerase_core.save_names import path_inside

    with pytest.raises(ZEraseError, match=why):
        path_inside(tmp_path, name, ".safetensors")
    with pytest.raises(ZEraseError, match=why):
        check_writable(tmp_path / f"{name}.safetensors")
    for fine in ("null", "console/aux_lora", "cat.v2"):
        path_inside(tmp_path, fine, ".safetensors")
        check_writable(tmp_path / f"{fine}.safetensors")
    (tmp_path / "aux").mkdir()  # a folder that exists was made by someone who could
    check_writable(tmp_path / "aux" / "red.safetensors")
    check_writable(tmp_path / "aux" / ".." / "red.json")  # a step of a path, not a name


def test_every_character_windows_refuses_below_the_space_is_refused_in_a_name():
    """Windows refuses each of the characters 1 to 31 in a file name, the last of them (unit separator, 0x1f) as much
    as a line break: a name holding one works here and not in a shared workflow there. The space itself is fine."""
    from zerase_core.files import check_portable

    for code in range(1, 32):
        with pytest.raises(ZEraseError, match="holds a control character"):
            check_portable(f"run{chr(code)}x")
    check_portable("run x")


@pytest.mark.parametrize("folder", ["run\n", "run\r", "a\tb", "x\x1b"])
def test_a_folder_to_make_with_a_control_character_is_refused(folder, tmp_path):
    """`--out $'runs/nl\\n'` (a line break pasted after the name) made the folder "nl\\n"; save names refused it
    already. Windows refuses characters 1–31 in names; a listing shows them as breaks. DEL and the C1 controls Windows
    takes: they stay allowed, as before."""
    from zerase_core.cli import main
    from zerase_core.files import check_writable

    check_writable(tmp_path / "run\x7f" / "red.safetensors")
    check_writable(tmp_path / "run\x85" / "red.safetensors")

    with pytest.raises(ZEraseError, match=r"holds a control character \(a line break, a tab\)"):
        check_writable(tmp_path / folder / "red.safetensors")
    assert main(["train", "--tiny", "--concept", "cat", "--steps", "1", "--out", str(tmp_path / folder)]) == 2
    assert list(tmp_path.iterdir()) == []


def test_a_place_with_no_folder_at_all_is_refused_by_name(monkeypatch):
    """A drive or share that is not there (Z:\\runs on Windows): no folder on the way exists to probe in."""
    import zerase_core.files as files

    monkeypatch.setattr(files.os.path, "isdir", lambda p: False)
    with pytest.raises(ZEraseError, match="No folder on the way to .* exists"):
        files.check_writable("/nowhere/runs/red.safetensors")


def test_a_save_name_too_long_is_refused_by_name_and_a_long_concept_makes_one_that_fits(tmp_path):
    """Path.exists() raises on a name the file system cannot hold: the lookup of earlier files crashed with a raw
    OSError once the folder existed."""
    from zerase_core.files import NAME_MAX
    from zerase_core.save_names import name_from, safe_output_path, saved_versions

    for lookup in (safe_output_path, saved_versions):
        with pytest.raises(ZEraseError, match="too long .*choose a shorter save name"):
            lookup(tmp_path, "y" * 250)
        with pytest.raises(ZEraseError, match="too long .*choose a shorter save name, or fewer subfolders"):
            lookup(tmp_path, "/".join(["d" * 200] * 25))  # each part fits; the whole path does not
    name = name_from("猫" * 90)  # 270 bytes as a concept; the node's default save name
    assert len(name.encode()) + len("_001.zerase-ckpt") <= NAME_MAX and name == "猫" * len(name)
    assert safe_output_path(tmp_path, name).name == name + ".safetensors"


def test_a_saved_lora_is_an_ordinary_file_not_a_private_one(tmp_path):
    """The file gets the mode the user's umask gives any new file (a private 0600 temporary would stay private
    after the rename, unreadable to another account serving the same models folder)."""
    import os

    old = os.umask(0o022)
    try:
        path = save_lora(_random_lora(KEYS), tmp_path / "red.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_lora_of_another_architecture_is_refused(tiny_backend):
    wide = _random_lora(KEYS, d_in=128, d_out=128)
    with pytest.raises(ZEraseError, match="different architecture.*layer 0 q: LoRA maps 128→128, model needs 64→64"):
        check_fits(wide, tiny_backend.fingerprint(), host_widths(tiny_backend))
    # Widths that fit, heads that do not: every fact both record is compared, as a merge compares them
    heads = ErasureLoRA(_random_lora(KEYS).factors, fingerprint=tiny_backend.fingerprint() | {"n_heads": 8})
    with pytest.raises(ZEraseError, match="different architecture .*n_heads: LoRA 8 vs model 2"):
        install_lora(tiny_backend, heads)
    deep = _random_lora([(5, "q")])
    with pytest.raises(ZEraseError, match="layer 5 q: the model has no such projection"):
        install_lora(tiny_backend, deep)


def test_a_rank_above_what_its_projection_holds_is_refused_before_anything_is_allocated(tiny_backend, monkeypatch):
    """A file with one factor of rank 50000 on a 64→64 projection was applied: every slot it spans was padded to that
    rank, a hundred times the file's size in memory. A rank above min(in, out) adds nothing; training refuses one."""
    from zerase_core.backends.diffusers_zimage import DiffusersZImageBackend

    lora = _random_lora([(0, "q"), (0, "k"), (1, "v")], rank=1)
    factors = lora.factors | {(0, "q"): (torch.randn(65, 64), torch.randn(64, 65))}
    monkeypatch.setattr(DiffusersZImageBackend, "install", lambda *a, **k: pytest.fail("allocated before refusing"))
    with pytest.raises(ZEraseError, match="rank exceeds what its projections can hold .layer 0 q: rank 65 on a "
                                          "64→64 projection.* re-train or re-download it, or merge them again"):
        install_lora(tiny_backend, replace(lora, factors=factors))
    with pytest.raises(ZEraseError, match="rank 65 on a 64→64"):
        check_fits(replace(lora, factors=factors), tiny_backend.fingerprint(), host_widths(tiny_backend))
    full = lora.factors | {(0, "q"): (torch.randn(64, 64), torch.randn(64, 64))}  # the most a 64→64 matrix holds
    check_fits(replace(lora, factors=full), tiny_backend.fingerprint(), host_widths(tiny_backend))


def test_an_exact_merge_past_what_a_projection_holds_stays_exact_and_applies(tiny_backend):
    """An exact merge's ranks add up: two rank-48 LoRAs on 64→64 projections made rank 96, which Apply then refused
    as above what the projection holds (a review reproduced it with two trained rank-64 LoRAs). Past min(in, out) the
    merge now keeps that rank, which holds the sum exactly."""
    first, second = (_random_lora(KEYS, rank=48, seed=seed, concept=c) for seed, c in ((0, "red"), (1, "blue")))
    merged = merge_exact([first, second], [1.0, 0.5])
    for key in KEYS:
        a, b = merged.factors[key]
        assert a.shape[0] == 64  # not 96
        want = sum(w * lora.multiplier * lora.factors[key][1] @ lora.factors[key][0]
                   for lora, w in ((first, 1.0), (second, 0.5)))
        torch.testing.assert_close(b @ a, want, rtol=1e-4, atol=1e-3)
    small = merge_exact([_random_lora(KEYS, rank=4), _random_lora(KEYS, rank=4, seed=1, concept="blue")])
    assert {a.shape[0] for a, _ in small.factors.values()} == {8}  # under it the factors are concatenated, as were
    install_lora(tiny_backend, merged)


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), 1e39])
def test_a_strength_that_is_not_a_finite_number_is_refused_as_the_strength(tiny_backend, strength):
    """It was refused by LoRAConfig, as "alpha, strength and alpha / rank · strength", with an alpha never set."""
    with pytest.raises(ZEraseError, match="^The strength must be a finite number .*got"):
        install_lora(tiny_backend, _random_lora(KEYS), strength=strength)


def test_stock_loaders_do_not_recognise_native_files(tiny_backend, tmp_path):
    """diffusers' LoRA loading must not silently apply an erasure LoRA ungated."""
    path = save_lora(_random_lora(KEYS), tmp_path / "red.safetensors")
    transformer = tiny_backend.transformer
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    from safetensors.torch import load_file

    try:
        transformer.load_lora_adapter(load_file(str(path)), adapter_name="stock")
    except (ValueError, KeyError, RuntimeError):
        pass  # refusing is fine too
    assert not any("lora" in name for name, _ in transformer.named_parameters())
    assert all(torch.equal(before[k], v) for k, v in transformer.state_dict().items() if k in before)


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "", "bad:name", "sub\n/cat"])
def test_save_name_cannot_leave_its_folder(tmp_path, name):
    with pytest.raises(ZEraseError, match="not allowed|would leave"):
        safe_output_path(tmp_path, name)


def test_save_name_never_overwrites(tmp_path):
    first = safe_output_path(tmp_path, "sub/red")
    first.parent.mkdir(parents=True)
    first.write_bytes(b"x")
    assert safe_output_path(tmp_path, "sub/red").name == "red_001.safetensors"


def test_saved_versions_are_found_across_a_gap(tmp_path):
    """A deleted red_001 must not hide red_002 (Train's reuse looks through these), nor other names match."""
    from zerase_core.save_names import saved_versions

    for name in ("red", "red_002", "red_010", "red_x", "reddish_001", "red_003.json"):
        (tmp_path / (name if "." in name else f"{name}.safetensors")).write_bytes(b"x")
    assert [p.name for p in saved_versions(tmp_path, "red")] == [
        "red.safetensors", "red_002.safetensors", "red_010.safetensors"]
    (tmp_path / "red.safetensors").unlink()
    assert [p.name for p in saved_versions(tmp_path, "red")] == ["red_002.safetensors", "red_010.safetensors"]


def test_exact_merge_is_the_weighted_sum_of_products():
    a, b = _random_lora(KEYS, seed=1, scale=0.5), _random_lora(KEYS[:2], seed=2, rank=3, scale=2.0)
    merged, report = merge([a, b], weights=[0.3, 0.7])
    assert report.relative_error == 0.0 and merged.rank == 7
    for key in KEYS:
        expected = 0.3 * a.delta_weight(key) + (0.7 * b.delta_weight(key) if key in b.factors else 0)
        assert torch.allclose(merged.delta_weight(key), expected, atol=1e-5)
    default = merge_exact([a, b])  # paper's w_i = 1/N
    mean = 0.5 * (a.delta_weight(KEYS[0]) + b.delta_weight(KEYS[0]))
    assert torch.allclose(default.delta_weight(KEYS[0]), mean, atol=1e-5)
    # A part's strength counts, by hand from its factors (delta_weight would carry the same mistake as the merge).
    import dataclasses

    weak = dataclasses.replace(a, strength=0.4)
    alone, _ = merge([weak, b], weights=[0.3, 0.7])
    (down, up), key = a.factors[KEYS[2]], KEYS[2]  # a key only a has
    assert torch.allclose(alone.delta_weight(key), 0.3 * 0.5 * 0.4 * (up.double() @ down.double()), atol=1e-6)


def test_a_merge_does_not_claim_to_preserve_what_it_erases():
    import dataclasses

    cat = dataclasses.replace(_random_lora(KEYS, concept="cat"), preserve=("dog", "bird"))
    dog = dataclasses.replace(_random_lora(KEYS, seed=1, concept="Dog"), preserve=("cat", "bird"))
    merged = merge_exact([cat, dog])
    assert merged.concept == "cat + Dog" and merged.preserve == ("bird",)
    van_gogh = dataclasses.replace(_random_lora(KEYS, seed=2, concept="Van Gogh"), preserve=("dog", "bird"))
    again = merge_exact([merged, dataclasses.replace(van_gogh, preserve=("van  gogh", "DOG", "moon"))])
    assert again.preserve == ("bird", "moon")  # a merge's parts erase each of "cat + Dog"; spacing and case as prompts


def test_exact_merge_agrees_with_peft_cat_merge():
    """peft's add_weighted_adapter(combination_type='cat') is the reference for the exact merge."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False))
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["0"]), adapter_name="first")
    peft_model.add_adapter("second", LoraConfig(r=3, lora_alpha=3, target_modules=["0"]))
    layer = peft_model.base_model.model[0]
    ours = []
    for name in ("first", "second"):
        torch.nn.init.normal_(layer.lora_B[name].weight)
        factors = {(0, "q"): (layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach())}
        ours.append(ErasureLoRA(factors, scale=layer.scaling[name]))
    peft_model.add_weighted_adapter(["first", "second"], [0.25, 0.75], "m", combination_type="cat")
    reference = layer.get_delta_weight("m").double()
    merged, _ = merge(ours, [0.25, 0.75])
    assert torch.allclose(merged.delta_weight((0, "q")), reference, atol=1e-5)


def test_svd_rerank_reports_error_that_shrinks_with_rank():
    merged = merge_exact([_random_lora(KEYS, seed=s) for s in range(3)])  # rank 12
    errors = []
    for rank in (1, 3, 6, 9, 12):
        low, report = rerank(merged, rank)
        true = sum((low.delta_weight(k) - merged.delta_weight(k)).square().sum() for k in KEYS) ** 0.5
        norm = sum(merged.delta_weight(k).square().sum() for k in KEYS) ** 0.5
        assert abs(report.relative_error - float(true / norm)) < 1e-6
        assert low.rank == rank
        errors.append(report.relative_error)
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:-1])) and errors[-1] < 1e-6


def test_a_rerank_keeps_the_scale_it_is_given_and_a_rank_that_holds_all_is_no_rerank():
    """rerank() is public: a trained file's ΔW carries its scale (alpha / rank), which the re-ranked factors must keep
    (the merge path only ever hands it scale 1); a merge asked for the rank it already has is exact, and its file
    must not say it approximates."""
    lora = _random_lora(KEYS, rank=2, scale=0.5)
    full, report = rerank(lora, 2)
    for key in KEYS:
        torch.testing.assert_close(full.delta_weight(key), lora.delta_weight(key), rtol=1e-5, atol=1e-6)
    assert report.relative_error < 1e-6 and full.multiplier == 1.0
    merged, report = merge([_random_lora(KEYS, rank=2), _random_lora(KEYS, rank=2, seed=1)], rank=4)
    assert report == MergeReport(4, 0.0) and "rerank" not in merged.training


def test_a_reranked_merge_says_in_its_file_that_it_approximates(tmp_path):
    """The relative error was printed once; the file itself did not tell that it is an approximation."""
    merged = merge_exact([_random_lora(KEYS, seed=s) for s in range(3)])
    low, report = rerank(merged, 3)
    kept = load_lora(save_lora(low, tmp_path / "merged.safetensors"))
    assert kept.training["rerank"] == {"rank": 3, "relative_error": pytest.approx(report.relative_error)}
    assert kept.training["merged_from"] == merged.training["merged_from"] and report.relative_error > 0.1


def test_a_merge_built_on_a_reranked_lora_keeps_the_record_of_its_loss(tmp_path):
    """A merge is exact, so its own report says 0; it replaced its parts' training record, and a file built on a 67 %
    re-rank said nothing of it (a review). Merged again, the record is carried on."""
    lossy, report = rerank(merge_exact([_random_lora(KEYS, seed=s) for s in range(3)]), 3)
    merged = load_lora(save_lora(merge_exact([lossy, _random_lora(KEYS, seed=5, concept="cow")]),
                                 tmp_path / "on_lossy.safetensors"))
    record = {"concept": lossy.concept, "rerank": {"rank": 3, "relative_error": pytest.approx(report.relative_error)}}
    assert merged.training["lossy_parts"] == [record] and report.relative_error > 0.1
    again = merge_exact([merged, _random_lora(KEYS, seed=6, concept="owl")])
    assert again.training["lossy_parts"] == [record]
    # a LoRA merged with itself, or with a merge holding it: each record once (the list doubled at every re-merge)
    assert merge_exact([lossy, lossy]).training["lossy_parts"] == [record]
    assert merge_exact([again, merged]).training["lossy_parts"] == [record]
    assert "lossy_parts" not in merge_exact([_random_lora(KEYS), _random_lora(KEYS, seed=1)]).training


@pytest.mark.parametrize("stored, concept", [("1984", "1984"), ("null", "null"), ("true", "true")])
def test_a_concept_an_earlier_version_stored_bare_reads_back_as_its_text(tmp_path, stored, concept):
    """Before strings that read as JSON were quoted, a concept "1984" was stored bare and reads as a number: it is its
    text again (a concept must be a string, which refused such files as damaged)."""
    tensors, meta = _damaged(_random_lora(KEYS))
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta | {"concept": stored})
    assert load_lora(tmp_path / "old.safetensors").concept == concept


def test_factors_that_share_memory_are_saved_and_read_back(tmp_path):
    """One tensor for two projections, or slices of one (the Python API allows both): safetensors refused to write
    tensors that share memory, a RuntimeError traceback."""
    a, b = torch.randn(4, 128), torch.randn(64, 4)
    shared = ErasureLoRA({(0, "q"): (a[:, :64], b), (0, "k"): (a[:, 64:], b)}, concept="cat")
    loaded = load_lora(save_lora(shared, tmp_path / "shared.safetensors"))
    assert all(torch.equal(loaded.factors[k][i], shared.factors[k][i]) for k in shared.factors for i in (0, 1))


def test_one_down_factor_for_two_projections_is_saved_and_read_back(tmp_path):
    """The same contiguous A for q and k (slices are copied on the way by the save's contiguous(), so they do not
    check it): each A is copied as each B is, else safetensors refused the two names of one tensor."""
    a = torch.randn(4, 64)
    shared = ErasureLoRA({(0, "q"): (a, torch.randn(64, 4)), (0, "k"): (a, torch.randn(64, 4))}, concept="cat")
    loaded = load_lora(save_lora(shared, tmp_path / "shared_a.safetensors"))
    assert torch.equal(loaded.factors[(0, "q")][0], a) and torch.equal(loaded.factors[(0, "k")][0], a)
    assert not torch.equal(loaded.factors[(0, "q")][1], loaded.factors[(0, "k")][1])


@pytest.mark.parametrize("exclusive", [False, True])
def test_a_save_under_a_file_says_the_file_is_in_the_way(tmp_path, exclusive):
    """A folder on the way that is a file: the save said the file to write had "appeared while this was written",
    which nothing had (callers without a check beforehand: the Python API, a run's saves)."""
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ZEraseError, match=r"notes.txt is a file, where a folder is needed; choose another place"):
        save_lora(_random_lora(KEYS), tmp_path / "notes.txt" / "deeper" / "cat.safetensors", exclusive=exclusive)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_save_into_a_file_as_its_folder_names_that_file(tmp_path):
    """The file in the way may be the save's own folder, not one above it: it is named too (looked for among the
    folder's parents alone, nothing was found and a StopIteration escaped in place of the refusal)."""
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ZEraseError, match=r"notes.txt is a file, where a folder is needed; choose another place"):
        save_lora(_random_lora(KEYS), tmp_path / "notes.txt" / "cat.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "x"


def test_merge_refuses_a_part_that_does_not_fit_the_architecture_it_records():
    """An official import records no architecture; with layers no other part has, nothing was compared, and the merge
    wrote a file that said dim 64 and 2 layers while holding a 3840-wide layer 20 (refused only at Apply)."""
    g = torch.Generator().manual_seed(0)
    official = ErasureLoRA({(20, "q"): (torch.randn(4, 3840, generator=g), torch.randn(3840, 4, generator=g))},
                           source="official-z-erase")
    misfit = (r"Cannot merge: a LoRA here was made for a different model .*\(width 64, 2 layers\); it does not fit at "
              r"layer 20 q \(3840→3840\)\.")
    with pytest.raises(ZEraseError, match=misfit):
        merge_exact([_random_lora(KEYS), official])
    # Its output side too: a q of 64→96 where no other part has one passed, as only the input was compared (a review)
    wide_out = ErasureLoRA({(1, "q"): (torch.randn(4, 64, generator=g), torch.randn(96, 4, generator=g))},
                           source="official-z-erase")
    with pytest.raises(ZEraseError, match=r"does not fit at layer 1 q \(64→96\)"):
        merge_exact([_random_lora(KEYS), wide_out])
    fits = ErasureLoRA({(1, "q"): (torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g))},
                       source="official-z-erase")
    assert merge_exact([_random_lora(KEYS), fits]).layers == (0, 1)  # an official part that fits still merges


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_merge_refuses_weights_that_are_not_finite(bad):
    """A NaN weight would write a file every loader then refuses: refuse it at the merge, naming the weights."""
    with pytest.raises(ZEraseError, match="finite"):
        merge_exact([_random_lora(KEYS, seed=0), _random_lora(KEYS, seed=1)], [bad, 1.0])


def test_the_merge_command_passes_weights_and_rank_on_and_prints_the_rerank_error(tmp_path, capsys):
    """`merge A B --weights … --rank R --out F` (README): the rank reaches the SVD re-rank, the weights the blend,
    and the printed JSON names the file, its rank and the relative_error the file records in training.rerank."""
    import json

    from zerase_core.cli import main
    from zerase_core.merge import merge

    loras = [_random_lora(KEYS, seed=1, concept="red"), _random_lora(KEYS, seed=2, concept="blue")]
    parts = [save_lora(lora, tmp_path / f"{lora.concept}.safetensors") for lora in loras]
    out = tmp_path / "merged.safetensors"
    assert main(["merge", *map(str, parts), "--weights", "1", "0.5", "--rank", "3", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected, report = merge(loras, [1.0, 0.5], 3)
    assert printed == {"out": str(out), "rank": 3, "relative_error": pytest.approx(report.relative_error)}
    assert printed["relative_error"] > 0.1
    written = load_lora(out)
    assert written.rank == 3 and written.training["weights"] == [1.0, 0.5]
    assert written.training["rerank"]["relative_error"] == pytest.approx(report.relative_error)


def test_merge_refuses_a_negative_weight_and_the_command_an_out_that_is_not_a_lora_file(tmp_path, capsys):
    """A negative weight adds its concept back (train refuses η < 0 for the same reason); `--out newdir/` wrote a
    file named newdir, as Path drops the slash."""
    from zerase_core.cli import main

    with pytest.raises(ZEraseError, match=r"weights must be finite numbers > 0 \(a negative one would strengthen"):
        merge_exact([_random_lora(KEYS, seed=0), _random_lora(KEYS, seed=1)], [-1.0, 1.0])
    for zero in ([0.0, 0.0], [0.0, 1.0]):  # a merge named "red + red" that erased nothing, or only the second
        with pytest.raises(ZEraseError, match=r"0 would keep nothing of its LoRA: leave that LoRA out"):
            merge_exact([_random_lora(KEYS, seed=0), _random_lora(KEYS, seed=1)], zero)
    files = [str(save_lora(_random_lora(KEYS, seed=s), tmp_path / f"{s}.safetensors")) for s in (0, 1)]
    assert main(["merge", *files, "--out", str(tmp_path / "newdir") + "/"]) == 2
    assert "--out names the merged LoRA file, ending in .safetensors" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.safetensors", "1.safetensors"]
    assert main(["merge", *files, "--out", str(tmp_path / ".safetensors")]) == 2  # a name without one, told by example
    assert "ending in .safetensors (e.g. merged.safetensors)" in capsys.readouterr().err
    assert main(["merge", *files, "--out", str(tmp_path / "BOTH.SAFETENSORS")]) == 0  # as Windows names it
    assert load_lora(tmp_path / "BOTH.SAFETENSORS").concept == "red"


def test_merge_refuses_different_architectures():
    a = _random_lora(KEYS)
    b = ErasureLoRA(_random_lora(KEYS).factors, fingerprint={"family": "z-image", "dim": 3840, "n_layers": 30})
    with pytest.raises(ZEraseError, match="different architectures"):
        merge([a, b])


def test_a_shared_files_concept_reaches_the_console_escaped(caplog):
    """A native file sets its concept and its source; one claiming to be official had its concept logged as it was:
    terminal escape codes and line breaks (a fake log line) reached the console (a review)."""
    hostile = "\x1b]0;PWNED\x07\x1b[31mRED\nFAKE LOG LINE: all good"
    official = ErasureLoRA(_random_lora(KEYS).factors, concept=hostile, source="official-z-erase")
    with caplog.at_level("WARNING"):
        merge_exact([official, _random_lora(KEYS, seed=1)])
    assert "official Z-Erase file" in caplog.text
    assert "\x1b" not in caplog.text and "\nFAKE" not in caplog.text


def test_merge_refuses_factors_that_do_not_fit_together_and_an_overflow():
    """An official file records no architecture: its widths still tell another model. Weights within bounds can
    still leave float32 once multiplied by a file's strength; that file no loader would take is refused at the
    merge."""
    official = ErasureLoRA(_random_lora(KEYS, d_in=32, d_out=32).factors, source="official-z-erase")
    with pytest.raises(ZEraseError, match="layer 0 k maps 32→32 vs 64→64"):  # keys in order: (0, k) first
        merge_exact([_random_lora(KEYS), official])
    with pytest.raises(ZEraseError, match=r"change to layer 0 q \(ΔW = .*\) leaves float32's range"):  # its own
        ErasureLoRA(_random_lora(KEYS).factors, scale=1e38)
    strong = _near_float32_max(_random_lora(KEYS))  # ΔW 2.9e38: within float32, as a file may hold it
    with pytest.raises(ZEraseError, match="overflows at layer 0 k"):
        merge_exact([strong, _random_lora(KEYS, seed=1)], [20.0, 1.0])
    with pytest.raises(ZEraseError, match="above 20"):  # the weights that overflowed before there was a bound
        merge_exact([_random_lora(KEYS), _random_lora(KEYS, seed=1)], [1e308, 1e308])


def test_merge_refuses_a_weight_past_any_strength_and_factors_that_are_not_finite(tmp_path, capsys):
    """1e38 is finite in float32, and was merged: a file whose ΔW was 1e38 times the trained one. A weight is the
    strength its LoRA enters the merge at, refused past Apply's 20; a merged factor that is not finite (a LoRA made in
    Python with NaN, a re-rank of factors near float32's limit, computed in float64) is refused, and nothing is
    written."""
    from zerase_core.cli import main

    red, blue = _random_lora(KEYS), _random_lora(KEYS, seed=1, concept="blue")
    with pytest.raises(ZEraseError, match=r"Merge weights \[1e\+38\] are above 20: .*Use weights near 1"):
        merge_exact([red, blue], [1e38, 1.0])
    assert merge_exact([red, blue], [20.0, 20.0]).training["weights"] == [20.0, 20.0]  # the bound itself merges
    files = [str(save_lora(lora, tmp_path / f"{lora.concept}.safetensors")) for lora in (red, blue)]
    assert main(["merge", *files, "--weights", "1e38", "1", "--out", str(tmp_path / "both.safetensors")]) == 2
    assert "are above 20" in capsys.readouterr().err and not (tmp_path / "both.safetensors").exists()
    with pytest.raises(ZEraseError, match="change to layer 0 q .* or its factors are not finite numbers"):
        ErasureLoRA({k: (a.clone().fill_(float("nan")), b) for k, (a, b) in red.factors.items()}, concept="nan")
    with pytest.raises(ZEraseError, match="overflows at layer 0 k: .*not finite.*no file was written"):
        merge([_near_float32_max(red), blue], [20.0, 1.0], rank=1)


def _near_float32_max(lora: ErasureLoRA) -> ErasureLoRA:
    """``lora`` with every factor entry 1.2e19: ΔW's entries are rank · 1.44e38 · scale (2.9e38 at rank 4 and 0.5),
    the most a LoRA may hold (float32's largest is 3.4e38)."""
    return replace(lora, factors={k: (torch.full_like(a, 1.2e19), torch.full_like(b, 1.2e19))
                                  for k, (a, b) in lora.factors.items()})


def test_merge_refuses_a_weight_whose_lora_rounds_to_nothing():
    """1e-300 passed as > 0, and its LoRA's factors were exactly 0 in float32: the case a weight of 0 is refused for
    (the merge named for a concept it keeps nothing of, and dropped from the preservation list)."""
    with pytest.raises(ZEraseError, match=r"Merge weights \[1e-300\] are so small .*round to 0 in float32"):
        merge_exact([_random_lora(KEYS), _random_lora(KEYS, seed=1, concept="blue")], [1e-300, 1.0])
    # what counts is the factors after the multiply: small B times a weight that is a normal float32 is nothing, a
    # subnormal product of ordinary factors is something
    small = ErasureLoRA({k: (a, b * 1e-20) for k, (a, b) in _random_lora(KEYS).factors.items()}, concept="small")
    with pytest.raises(ZEraseError, match=r"Merge weights \[1e-30\] are so small"):
        merge_exact([small, _random_lora(KEYS, seed=1, concept="blue")], [1e-30, 1.0])
    kept = merge_exact([_random_lora(KEYS), _random_lora(KEYS, seed=1, concept="blue")], [1e-40, 1.0])
    assert kept.factors[KEYS[0]][1][:, :4].any()  # red's part: subnormal, not nothing


def test_one_lora_merged_with_itself_keeps_its_concept():
    """The re-rank recipe (one LoRA into both inputs, weights 1/2 each) is that LoRA: named "red", not "red + red",
    which a further merge would carry ("red + red + blue")."""
    lora = _random_lora(KEYS)
    merged, report = merge([lora, lora], rank=2)
    assert merged.concept == "red" and merged.training["merged_from"] == ["red", "red"]
    assert merge_exact([merged, _random_lora(KEYS, concept="blue")]).concept == "red + blue"
    both = merge_exact([merged, _random_lora(KEYS, concept="blue")])
    assert merge_exact([both, _random_lora(KEYS, seed=2)]).concept == "red + blue"  # "red" again: not "… + red"


def test_merge_compares_what_both_files_record():
    """A file recording less (an older version's, an official import) merges; the result records the union."""
    full = {"family": "z-image-tiny", "dim": 64, "n_layers": 2, "n_heads": 2}
    older = _random_lora(KEYS)  # family, dim, n_layers
    newer = ErasureLoRA(_random_lora(KEYS, seed=1).factors, fingerprint=full)
    official = ErasureLoRA(_random_lora(KEYS, seed=2).factors)
    assert merge_exact([older, newer, official]).fingerprint == full
    with pytest.raises(ZEraseError, match="differ in n_heads"):
        merge_exact([newer, ErasureLoRA(older.factors, fingerprint=full | {"n_heads": 4})])


def test_a_save_name_made_from_a_concept_is_always_allowed(tmp_path):
    from zerase_core.save_names import name_from, path_inside

    for concept, expected in [("Mickey Mouse (Disney)", "Mickey Mouse _Disney_"), ("AC/DC", "AC_DC"),
                              ("nude, naked", "nude_ naked"), ("梵高", "梵高"), ("..", "zerase"), ("?!", "zerase"),
                              ("NUL", "NUL_"), ("con.", "con_"), ("con.v2", "con_.v2"), ("NUL .x", "NUL_.x"),
                              ("COM¹", "COM¹_"), ("Con Air", "Con Air")]:  # Windows device names
        assert name_from(concept) == expected
        assert path_inside(tmp_path, name_from(concept), ".safetensors").parent == tmp_path.resolve()


@pytest.mark.parametrize("hard_links", [True, False])
def test_an_exclusive_save_writes_a_new_file_and_never_replaces_one(tmp_path, monkeypatch, hard_links):
    """A file system without hard links (FAT, exFAT) takes the check-then-rename path; both refuse an existing file."""
    import os

    def no_links(*args):
        raise PermissionError(1, "Operation not permitted")

    if not hard_links:
        monkeypatch.setattr(os, "link", no_links)
    lora = _random_lora(KEYS)
    path = save_lora(lora, tmp_path / "new.safetensors", exclusive=True)
    assert torch.equal(load_lora(path).factors[KEYS[0]][0], lora.factors[KEYS[0]][0])
    (tmp_path / "taken.safetensors").write_text("kept")
    with pytest.raises(ZEraseError, match="it was not replaced"):
        save_lora(lora, tmp_path / "taken.safetensors", exclusive=True)
    assert (tmp_path / "taken.safetensors").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.safetensors", "taken.safetensors"]


@pytest.mark.skipif(os.name == "nt", reason="symbolic links need privileges on Windows")
@pytest.mark.parametrize("hard_links", [True, False])
def test_an_exclusive_save_never_replaces_a_link_to_nothing(tmp_path, monkeypatch, hard_links):
    """A link whose target is gone is still a name taken (the user's, or another tool's): without hard links the check
    before the rename followed the link, found nothing there and replaced the link with the new file."""
    def no_links(*args):
        raise PermissionError(1, "Operation not permitted")

    if not hard_links:
        monkeypatch.setattr(os, "link", no_links)
    (tmp_path / "taken.safetensors").symlink_to(tmp_path / "gone.safetensors")
    with pytest.raises(ZEraseError, match="it was not replaced"):
        save_lora(_random_lora(KEYS), tmp_path / "taken.safetensors", exclusive=True)
    assert os.readlink(tmp_path / "taken.safetensors") == str(tmp_path / "gone.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.safetensors"]


def _fp32_sum_error(expected: torch.Tensor) -> float:
    """What fp32 rounding may leave in an entry of x A^T B^T against its float64 value: a few float32 epsilons of the
    largest entry, not of the entry itself (an entry near 0 is a sum of terms as large as the others; torch 2.11's
    CPU kernels, summing in another order, missed atol 1e-6 by 1e-5 on entries of 13). A wrong scale or strength is
    off by 30 % or more of every entry."""
    return 100 * torch.finfo(torch.float32).eps * expected.abs().max().item()


def test_an_applied_lora_adds_its_delta_weight_at_its_scale_and_strength():
    """What the model adds on text rows is x (scale · strength · Apply's strength · B A)ᵀ, the ΔW the file describes: an
    official file's alpha ≠ rank and a node's strength reach the forward (every other test applies scale 1)."""
    import dataclasses

    from zerase_core.tiny import tiny_zimage_backend

    backend = tiny_zimage_backend()
    dim = backend.fingerprint()["dim"]
    lora = dataclasses.replace(_random_lora([(0, "q"), (1, "v")], d_in=dim, d_out=dim, scale=0.5), strength=0.7)
    lora_set = install_lora(backend, lora, strength=2.0)
    x = torch.randn(5, dim, generator=torch.Generator().manual_seed(3))
    for key in [(0, "q"), (1, "v")]:
        added = lora_set.slots[key].delta(key[1], x).double()
        expected = x.double() @ (2.0 * lora.delta_weight(key)).T  # delta_weight carries scale · strength
        assert torch.allclose(added, expected, rtol=1e-5, atol=_fp32_sum_error(expected))
    # Apply's strength goes below 0 too (its widget: −20 … 20): the negated ΔW, not nothing
    negative = install_lora(backend, lora, name="negative", strength=-1.0)
    for key in [(0, "q"), (1, "v")]:
        added = negative.slots[key].delta(key[1], x).double()
        expected = x.double() @ (-lora.delta_weight(key)).T
        assert torch.allclose(added, expected, rtol=1e-5, atol=_fp32_sum_error(expected))
    # applied, not trained: frozen, so no graph is built for it (memory) and a LoRA trained on top leaves it alone
    assert not any(p.requires_grad for p in lora_set.parameters())
    v, _ = backend.velocity(torch.randn(1, *backend.latent_shape(64, 64)), torch.tensor([0.5]),
                            backend.encode(["a red ball"]))
    assert not v.requires_grad


def test_a_merge_saved_again_under_its_name_is_the_file_it_wrote(tmp_path):
    """The Merge node runs again after every restart of ComfyUI (an output node), and each run saved another
    identical file (cat_dog_001, _002, … in every LoRA list). A file that holds exactly the merge is taken; any
    other content, even one factor's last bit, gets the next free name as before."""
    from zerase_core.lora_file import saved_or_new

    a, b = _random_lora(KEYS, seed=1, concept="cat"), _random_lora(KEYS, seed=2, concept="dog")
    merged, _ = merge([a, b])
    first, written = saved_or_new(merged, tmp_path, "cat_dog")
    assert written and first.name == "cat_dog.safetensors"
    assert saved_or_new(merge([a, b])[0], tmp_path, "cat_dog") == (first, False)
    other, _ = merge([a, b], [1.0, 1.0])  # other weights: other metadata and factors
    assert saved_or_new(other, tmp_path, "cat_dog") == (tmp_path / "cat_dog_001.safetensors", True)
    factors = dict(merged.factors)
    a0, b0 = factors[KEYS[0]]
    factors[KEYS[0]] = (a0, torch.nextafter(b0, torch.full_like(b0, 2.0)))  # the metadata alike, one factor not
    assert saved_or_new(replace(merged, factors=factors), tmp_path, "cat_dog")[0].name == "cat_dog_002.safetensors"
    # the factors alike, the metadata not (another preservation list): a new file too
    assert saved_or_new(replace(merged, preserve=("cow",)), tmp_path, "cat_dog")[0].name == "cat_dog_003.safetensors"
    (tmp_path / "cat_dog.safetensors").write_bytes(b"damaged")  # not this merge any more: a new file, none replaced
    assert saved_or_new(merged, tmp_path, "cat_dog") == (tmp_path / "cat_dog_004.safetensors", True)
    assert saved_or_new(merged, tmp_path, "cat_dog") == (tmp_path / "cat_dog_004.safetensors", False)


def test_a_merge_rank_below_1_is_refused_before_the_merge_gives_its_advice(caplog):
    """`merge A B --rank 0` logged the 1/N weights' advice, then refused the rank."""
    import logging

    caplog.set_level(logging.INFO)
    with pytest.raises(ZEraseError, match="The merge rank must be at least 1, got 0"):
        merge([_random_lora(KEYS), _random_lora(KEYS, seed=1)], rank=0)
    assert caplog.records == []
    assert merge([_random_lora(KEYS), _random_lora(KEYS, seed=1)], rank=1)[1].rank == 1
    assert "1/2 each" in caplog.text  # what it logged before: said once the rank is fine


@pytest.mark.parametrize("exclusive", [False, True])
def test_an_atomic_save_is_on_disk_before_it_takes_its_name(tmp_path, monkeypatch, exclusive):
    """Renamed before its data reached the disk, a power cut could leave an empty LoRA or checkpoint under the real
    name, the old one gone (a mutation audit: dropping the fsync failed no test)."""
    import os

    import zerase_core.files as files

    events = []
    for name in ("fsync", "replace", "link", "rename"):
        real = getattr(os, name)
        monkeypatch.setattr(files.os, name, lambda *a, n=name, r=real: (events.append(n), r(*a))[1])
    files.atomic_save({"x": torch.zeros(2)}, tmp_path / "a.safetensors", {"k": "v"}, exclusive=exclusive)
    assert events[0] == "fsync" and len(events) == 2, events  # then the one rename (or link) that names it


def test_every_describing_field_survives_a_save(tmp_path):
    """A LoRA saved with a strength other than 1 (the Python API's) is read back with it, and its preservation
    concepts and curves too."""
    lora = replace(_random_lora(KEYS), strength=2.5, preserve=("dog", "cat"), history={"L_erase": [0.5, 0.25]})
    back = load_lora(save_lora(lora, tmp_path / "s.safetensors"))
    assert (back.strength, back.preserve, back.history) == (2.5, ("dog", "cat"), {"L_erase": [0.5, 0.25]})
    assert back.metadata() == lora.metadata()


def test_a_path_stepping_back_out_of_a_folder_still_to_be_made_is_refused(tmp_path):
    """"new/../red.safetensors" with no folder new: the system itself refuses to open it, and saving would make new
    only to step out of it, leaving an empty folder beside the file. Refused before any work, nothing made; through
    a folder that exists the same step is an ordinary path."""
    from zerase_core.files import check_writable

    with pytest.raises(ZEraseError, match="steps back out of .*new with '..', and that folder does not exist"):
        check_writable(tmp_path / "new" / ".." / "red.safetensors")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "there").mkdir()
    check_writable(tmp_path / "there" / ".." / "red.safetensors")
    save_lora(_random_lora(KEYS), tmp_path / "there" / ".." / "red.safetensors", exclusive=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["red.safetensors", "there"]


def test_a_merge_needs_two_loras_and_exactly_one_weight_each():
    """One LoRA is no merge (it would only be rewritten under a merge's name), and a weight left over names a LoRA that
    is not there: zip would drop it silently and the file would record a weight that was never applied."""
    with pytest.raises(ZEraseError, match="at least two erasure LoRAs"):
        merge_exact([_random_lora(KEYS)])
    with pytest.raises(ZEraseError, match="Got 3 weights for 2 LoRAs"):
        merge_exact([_random_lora(KEYS, seed=1), _random_lora(KEYS, seed=2)], [1.0, 1.0, 1.0])


def test_a_merge_of_parts_recording_no_base_records_none_and_loads_back(tmp_path):
    """Parts from before the base digest record no "base": the merge must leave it out, not write null, which the
    file reader refuses (training.base must be a string)."""
    merged = merge_exact([_random_lora(KEYS, seed=1), _random_lora(KEYS, seed=2)])
    assert "base" not in merged.training
    assert "base" not in load_lora(save_lora(merged, tmp_path / "m.safetensors")).training


def test_an_official_part_is_refused_at_the_first_layer_past_the_model_and_at_another_width():
    """An official import records no architecture, so each of its factors is checked against the others' fingerprint
    (64 wide, 2 layers) on its own: layer 2 is the first one past the model, and a 32-wide factor at a projection no
    other part holds meets no width clash there."""
    g = torch.Generator().manual_seed(0)

    def official(key, width):
        return ErasureLoRA({key: (torch.randn(4, width, generator=g), torch.randn(64, 4, generator=g))},
                           source="official-z-erase")

    with pytest.raises(ZEraseError, match=r"does not fit at layer 2 q \(64→64\)"):
        merge_exact([_random_lora(KEYS), official((2, "q"), 64)])
    with pytest.raises(ZEraseError, match=r"does not fit at layer 1 q \(32→64\)"):
        merge_exact([_random_lora(KEYS), official((1, "q"), 32)])


def test_host_widths_of_a_fused_qkv_layer_are_each_slices_own_width():
    """ComfyUI's model fuses q, k and v into one linear layer whose slices start past 0: each projection's width is
    its slice's length, not where it ends (k and v would be refused as twice and three times too wide)."""
    from types import SimpleNamespace

    from zerase_core.backends.base import HostSlot

    fused = SimpleNamespace(host_slots=lambda: [HostSlot(3, "qkv", {"q": (0, 8), "k": (8, 16), "v": (16, 24)}, 8)])
    assert host_widths(fused) == {(3, "q"): (8, 8), (3, "k"): (8, 8), (3, "v"): (8, 8)}


def test_an_installed_lora_exports_at_the_strength_it_was_installed_at(tiny_backend):
    """export_lora snapshots a LoRASet as it acts: its strength (a run's lora.strength, or an applied file's strength
    times Apply's) is kept, so the exported file changes the model as the installed set did."""
    lora = replace(_random_lora(KEYS), strength=0.5)
    again = export_lora(install_lora(tiny_backend, lora, strength=0.4))
    assert again.strength == pytest.approx(0.2)
    for key in KEYS:
        assert torch.allclose(again.delta_weight(key), lora.delta_weight(key) * 0.4, atol=1e-5)


def test_an_applied_lora_is_put_to_rest_by_its_backend(tiny_backend, monkeypatch):
    """install_lora hands the frozen set to backend.rest, where a host that loads its model only to run it (ComfyUI)
    moves it beside the model's offloaded weights; skipped, the LoRA stayed where it was built."""
    rested = []
    monkeypatch.setattr(tiny_backend, "rest", rested.append)
    lora_set = install_lora(tiny_backend, _random_lora(KEYS))
    assert rested == [lora_set]
