"""The real-model path (`train --model FOLDER`) on a tiny diffusers Z-Image folder built offline: a byte-level BPE
tokenizer trained here, a tiny Qwen3 text encoder, a tiny Z-Image transformer, saved as diffusers lays them out."""

from __future__ import annotations

import json

import pytest
import torch

from zerase_core.errors import ZEraseError

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SHIFT = 6.0
CORPUS = ["a photo of a red ball", "blue sky at night", "a red circle on the left", "user assistant"] * 20


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    from zerase_core.tiny import small_zimage

    root = tmp_path_factory.mktemp("z-image")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    text = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    # as Qwen3 ships: a causal LM ("model." keys, lm_head tied), of which the loader takes the Qwen3Model
    Qwen3ForCausalLM(text).save_pretrained(root / "text_encoder")
    transformer = small_zimage(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, axes_dims=(8, 12, 12),
                               axes_lens=(256, 64, 64), in_channels=16, patch_size=2, cap_feat_dim=32)
    with torch.no_grad():
        for p in transformer.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.02)  # diffusers zero-initialises some layers; a trained model has none
    transformer.save_pretrained(root / "transformer")
    _vae().save_pretrained(root / "vae")
    (root / "scheduler").mkdir()  # Z-Image Turbo's has shift 3; another value shows it is read
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": SHIFT,
         "use_dynamic_shifting": False}))
    return root


def _vae(latent_channels: int = 16):
    """A tiny AutoencoderKL as Z-Image's (Flux's) VAE is laid out: 8 pixels per latent cell, scaled and shifted."""
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=latent_channels, norm_num_groups=4,
                         scaling_factor=0.3611, shift_factor=0.1159)


def test_loaded_folder_encodes_through_the_chat_template_and_finds_the_concept(folder):
    from zerase_core.backends.diffusers_loader import load_diffusers_zimage
    from zerase_core.prompts import concept_token_indices

    backend = load_diffusers_zimage(folder)
    red, empty = backend.encode(["a photo of a red ball", ""])
    assert empty.n_tokens > 0  # the template alone, as Z-Image's pipeline encodes the empty prompt
    hit = concept_token_indices(red, "red")
    assert hit and all(red.text[slice(*red.spans[i])].strip() == "red" for i in hit)
    assert red.features.shape[-1] == 32 and torch.isfinite(red.features).all()
    backend.encoder.max_length = 24  # Z-Image's is 512; a template past it was cut, and its concept "not covered"
    with pytest.raises(ZEraseError, match="tokens in Z-Image's chat template; its text encoder reads at most 24"):
        backend.encode(["a photo of a ball, " * 4 + "red"])


def _train_argv(model, steps: int = 2) -> list[str]:
    """`train --model` at the tests' tiny settings, without --out."""
    return ["train", "--model", str(model), "--concept", "red", "--preserve", "blue", "--template",
            "a photo of a {} ball", "--steps", str(steps), "--resolution", "64", "--rank", "2", "--xt-pool", "2"]


def test_train_on_a_model_folder_writes_the_lora(folder, tmp_path):
    from zerase_core.cli import main
    from zerase_core.lora_file import load_lora

    out = tmp_path / "run"
    code = main([*_train_argv(folder), "--out", str(out)])
    assert code == 0
    lora = load_lora(out / "erasure_lora.safetensors")
    assert lora.concept == "red" and lora.training["steps_done"] == 2
    assert lora.training["shift"] == SHIFT  # x_t sampled on the folder's own σ schedule, not TrainConfig's 3
    assert len(json.loads((out / "history.json").read_text())) == 2


def test_train_on_a_model_folder_releases_the_text_encoder_once(folder, tmp_path, monkeypatch):
    """`train --model` frees the text encoder as soon as the run's prompts are encoded (Qwen3-4B: 8 GB in bf16 that
    the transformer's training needs on a 16-24 GB card); nothing tested that the command asks for it (a mutation
    audit: `release_encoder=False` passed every test)."""
    from zerase_core.backends.diffusers_zimage import DiffusersZImageBackend
    from zerase_core.cli import main

    released = []
    real = DiffusersZImageBackend.release_encoder
    monkeypatch.setattr(DiffusersZImageBackend, "release_encoder", lambda self: released.append(self) or real(self))
    assert main([*_train_argv(folder), "--out", str(tmp_path / "run")]) == 0
    assert len(released) == 1


def _fine_tuned(folder, part: str, prefix: str) -> None:
    """One tensor of ``part``'s weights moved, as a fine-tune would."""
    from safetensors.torch import load_file, save_file

    (weights,) = (folder / part).glob("*.safetensors")
    tensors = load_file(weights)
    name = next(k for k in tensors if k.startswith(prefix))
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights, metadata={"format": "pt"})


def test_a_run_is_not_resumed_on_another_model_of_the_same_sizes(folder, tmp_path, capsys):
    """The loaded model's digest (its weight files, sampled: the transformer's and the text encoder's, whose prompt
    features it trains on) goes into the checkpoint; a folder with other weights in either is refused on --resume
    before any work, and the same weights elsewhere (a copy) are accepted."""
    import shutil

    from zerase_core.backends.diffusers_loader import folder_digest, weights_digest
    from zerase_core.cli import main

    other, other_encoder, copy = tmp_path / "finetune", tmp_path / "other_encoder", tmp_path / "copy"
    for made in (other, other_encoder, copy):
        shutil.copytree(folder, made)
    _fine_tuned(other, "transformer", "layers.1.attention.to_q")
    _fine_tuned(other_encoder, "text_encoder", "model.layers.0.self_attn.q_proj")
    assert folder_digest(other_encoder) != folder_digest(folder) != folder_digest(other) is not None
    assert weights_digest(other / "transformer") != weights_digest(folder / "transformer")
    assert weights_digest(copy / "transformer") == weights_digest(folder / "transformer")
    (copy / "transformer" / "erasure_lora.safetensors").write_bytes(b"x" * 100)  # a run's --out inside the folder
    (copy / "transformer" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"x" * 100)  # a variant: unloaded
    assert weights_digest(copy / "transformer") == weights_digest(folder / "transformer")  # counted, it locked resume

    def run(model, steps, *extra):
        return main([*_train_argv(model, steps), "--out", str(tmp_path / "run"), *extra])

    assert run(folder, 1) == 0
    for refused in (other, other_encoder):
        assert run(refused, 2, "--resume") == 2  # refused: trained on another model
        assert "was trained on another model: on the command line another --model folder" in capsys.readouterr().err
    assert run(copy, 2, "--resume") == 0


def test_a_folder_without_its_files_names_the_part_that_is_missing(tmp_path):
    from zerase_core.backends.diffusers_loader import load_diffusers_zimage

    for part in ("transformer", "text_encoder", "tokenizer"):
        (tmp_path / part).mkdir()
    with pytest.raises(ZEraseError, match=r"(?s)Cannot load .*tokenizer/.*config and weight files"):  # loaded first
        load_diffusers_zimage(tmp_path)
    with pytest.raises(ZEraseError, match="not a diffusers Z-Image folder: missing text_encoder/[.]"):
        (tmp_path / "text_encoder").rmdir()
        load_diffusers_zimage(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZEraseError, match="missing transformer/, text_encoder/, tokenizer/[.]$"):  # each a folder
        load_diffusers_zimage(tmp_path / "empty")


def test_a_missing_transformers_is_named_with_the_fix(tmp_path, monkeypatch):
    import sys

    from zerase_core.backends.diffusers_loader import load_diffusers_zimage

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed (requirements-engine.txt alone)
    # A mistyped path is told as such first, not as a package to install.
    with pytest.raises(ZEraseError, match="no-such-folder is not a folder; --model takes a diffusers Z-Image folder"):
        load_diffusers_zimage(tmp_path / "no-such-folder")
    for part in ("transformer", "text_encoder", "tokenizer"):
        (tmp_path / part).mkdir()
    with pytest.raises(ZEraseError, match="pip install transformers accelerate"):
        load_diffusers_zimage(tmp_path)


def test_the_flow_shift_comes_from_the_scheduler_config_and_a_damaged_one_is_named(tmp_path):
    from zerase_core.backends.diffusers_loader import scheduler_shift

    assert scheduler_shift(tmp_path) is None  # no scheduler/: TrainConfig's shift
    (tmp_path / "scheduler").mkdir()
    config = tmp_path / "scheduler" / "scheduler_config.json"
    config.write_text('{"shift": 3.0, "use_dynamic')
    with pytest.raises(ZEraseError, match="scheduler_config.json.*Restore the file"):
        scheduler_shift(tmp_path)
    for written in ("0", "Infinity", "NaN"):  # Python's json reads the last two; TrainConfig refused inf only later
        config.write_text(f'{{"shift": {written}}}')
        with pytest.raises(ZEraseError, match="it must be a finite number > 0"):
            scheduler_shift(tmp_path)
    config.write_text('{"shift": 3.0}')
    assert scheduler_shift(tmp_path) == 3.0
    config.write_text('{"num_train_timesteps": 1000}')
    assert scheduler_shift(tmp_path) == 1.0  # diffusers' default where the config names none


def _copy(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / "copy")


@pytest.mark.parametrize("part, change, message", [
    ("text_encoder", {"hidden_size": 48}, "the text encoder gives 48-wide features and the transformer takes 32"),
    ("transformer", {"_class_name": "FluxTransformer2DModel"}, "holds a FluxTransformer2DModel, not Z-Image's"),
])
def test_parts_that_are_not_one_z_image_are_refused_before_loading(folder, tmp_path, monkeypatch, part, change,
                                                                   message):
    """A text encoder of another width failed while the x_t pool was sampled, after the loads (minutes on the real
    model); a Flux transformer loaded with its weights unset and failed as a meta-tensor copy."""
    import zerase_core.backends.diffusers_loader as loader

    copy = _copy(folder, tmp_path)
    config = copy / part / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | change))
    monkeypatch.setattr(loader, "_loaded", lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(ZEraseError, match=message):
        loader.load_diffusers_zimage(copy)


def test_a_damaged_text_encoder_file_is_refused_by_name(folder, tmp_path):
    """safetensors raises its own SafetensorError for a truncated file, which the loader let through as a traceback."""
    from zerase_core.backends.diffusers_loader import load_diffusers_zimage

    copy = _copy(folder, tmp_path)
    weights = next((copy / "text_encoder").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:20000])
    with pytest.raises(ZEraseError, match=r"Cannot load .*text_encoder/ .* has transformer/, text_encoder/ and "
                                          r"tokenizer/"):
        load_diffusers_zimage(copy)


@pytest.mark.parametrize("part, stored, tensor", [
    ("transformer", "context_refiner.0.attention.to_q.weight", "context_refiner.0.attention.to_q.weight"),
    ("text_encoder", "model.layers.1.self_attn.q_proj.weight", "layers.1.self_attn.q_proj.weight"),  # Qwen3Model's
])
def test_a_weight_file_lacking_a_tensor_is_refused_by_part(folder, tmp_path, part, stored, tensor):
    """The transformer failed later as "Cannot copy out of meta tensor" (a traceback after the prompts were encoded);
    the text encoder trained to the end with that tensor random."""
    from safetensors.torch import load_file, save_file

    from zerase_core.backends.diffusers_loader import load_diffusers_zimage

    copy = _copy(folder, tmp_path)
    weights = next((copy / part).glob("*.safetensors"))
    tensors = load_file(weights)
    del tensors[stored]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ZEraseError, match=rf"Cannot load .*{part}/: its weight files lack {tensor}\. Restore it"):
        load_diffusers_zimage(copy)


def test_a_text_encoder_or_tokenizer_of_another_model_is_refused_before_it_is_loaded(folder, tmp_path, monkeypatch):
    """A T5 encoder (its width is d_model, which the width check does not read) failed inside the encoder; a
    tokenizer with more tokens than the encoder embeds was an IndexError; both after the loads."""
    import zerase_core.backends.diffusers_loader as loader

    copy = _copy(folder, tmp_path)
    config = copy / "text_encoder" / "config.json"
    settings = json.loads(config.read_text())
    config.write_text(json.dumps(settings | {"model_type": "t5"}))
    monkeypatch.setattr(loader, "_loaded", lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(ZEraseError, match="text_encoder/ holds a t5 model, not Z-Image's Qwen3 text encoder"):
        loader.load_diffusers_zimage(copy)
    for not_an_object in ("null", "[]"):  # JSON all the same: an AttributeError traceback once
        config.write_text(not_an_object)
        with pytest.raises(ZEraseError, match=r"Cannot read .*config.json \(TypeError: it must be a JSON object, "
                                              r"got (NoneType|list)\)\. Restore it"):
            loader.load_diffusers_zimage(copy)
    config.write_text(json.dumps(settings | {"vocab_size": 100}))
    monkeypatch.undo()  # the tokenizer is loaded (seconds); the models must not be (minutes)
    monkeypatch.setattr(loader, "_loaded_whole", lambda *a, **k: pytest.fail("a model loaded before the check"))
    with pytest.raises(ZEraseError, match=r"tokenizer/ has \d+ tokens and the text encoder embeds 100"):
        loader.load_diffusers_zimage(copy)


def test_the_run_folder_is_checked_before_the_model_is_loaded(folder, tmp_path, monkeypatch, capsys):
    """A taken --out, --resume without a checkpoint, or a checkpoint of other settings were told after the model
    had loaded: minutes on the real one, to learn of a typo."""
    import zerase_core.backends.diffusers_loader as loader
    from zerase_core.cli import main

    flags = _train_argv(folder)
    out = tmp_path / "run"
    assert main([*flags, "--out", str(out)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(loader, "load_diffusers_zimage", lambda *a, **k: pytest.fail("loaded before the check"))
    for extra, message in ((["--out", str(out)], "holds erasure_lora.safetensors, curves.png, history.json, "
                                                 "before_after.png of an earlier run"),
                           (["--out", str(tmp_path / "none"), "--resume"], "No checkpoint to resume"),
                           (["--out", str(out), "--resume", "--rank", "3"],
                            "different settings (lora.rank: 2 then, 3 now)")):  # was two whole LoRA settings dicts
        assert main([*flags, *extra]) == 2 and message in capsys.readouterr().err


def test_parts_whose_configs_do_not_record_their_widths_are_not_refused(tmp_path):
    """The widths are compared only where both configs record them: a transformer config without cap_feat_dim is
    checked by the loads, not refused as another model's part."""
    from zerase_core.backends.diffusers_loader import check_parts_agree

    for part, config in (("transformer", {"_class_name": "ZImageTransformer2DModel"}),
                         ("text_encoder", {"model_type": "qwen3", "hidden_size": 32})):
        (tmp_path / part).mkdir()
        (tmp_path / part / "config.json").write_text(json.dumps(config))
    check_parts_agree(tmp_path)


def _cell(picture, row: int, column: int, size: int = 64):
    """The pixels of one cell of a before_after grid (render.grid: 90 px of row labels, 18 of column labels)."""
    import numpy as np

    left, top = 90 + column * size, 18 + row * size
    return np.asarray(picture.convert("RGB"))[top:top + size, left:left + size]


def test_train_on_a_model_folder_draws_original_and_erased_with_the_folders_vae(folder, tmp_path):
    """`train --model` has no node to show what it erased, so it draws before_after.png: the erase prompt and the
    preservation prompt (rows), original | erased (columns), on the run's sampler from its preview noise, decoded
    by the folder's VAE as ZImagePipeline decodes. The original cells are the pictures made again here, bit for bit."""
    import numpy as np
    from PIL import Image

    from zerase_core.backends.diffusers_loader import load_decoder, load_diffusers_zimage
    from zerase_core.cli import main
    from zerase_core.comparison import comparison_texts
    from zerase_core.config import TrainConfig
    from zerase_core.render import to_pil
    from zerase_core.sampling import before_after

    out = tmp_path / "run"
    assert main([*_train_argv(folder), "--out", str(out)]) == 0
    picture = Image.open(out / "before_after.png")
    assert picture.width == 90 + 2 * 64 and picture.height > 18 + 2 * 64  # two rows, a caption below

    config = TrainConfig(concept="red", preserve=("blue",), templates=("a photo of a {} ball",), height=64, width=64,
                         shift=SHIFT)  # what the picture's sampling reads of the run's settings
    assert comparison_texts(config) == ["a photo of a red ball", "a photo of a blue ball"]
    backend = load_diffusers_zimage(folder)
    decode = load_decoder(folder, backend.device, backend.dtype)
    for row, prompt in enumerate(backend.encode(comparison_texts(config))):
        original = to_pil(decode(before_after(backend, prompt, config)[0])[0])
        assert np.array_equal(_cell(picture, row, 0), np.asarray(original))
    # The decoding is ZImagePipeline's: latents / scaling_factor + shift_factor through the VAE, [-1, 1] to [0, 1]
    # (in fp32 on the CPU, as the reference below runs: on a GPU the run decodes in bf16).
    decode = load_decoder(folder, torch.device("cpu"), torch.float32)
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor

    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pixels = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    expected = VaeImageProcessor().postprocess(pixels, output_type="pt").permute(0, 2, 3, 1)
    torch.testing.assert_close(decode(latents), expected)


def test_the_picture_of_a_trained_lora_differs_where_it_erases(folder):
    """comparison() puts the LoRA's pictures in the erased column: with a LoRA that changes the model, each row's
    erased cell differs from its original one, and the original cells are those of the model without it."""
    import numpy as np

    from zerase_core.backends.diffusers_loader import load_decoder, load_diffusers_zimage
    from zerase_core.comparison import comparison
    from zerase_core.config import TrainConfig
    from zerase_core.lora import LoRAConfig
    from zerase_core.render import to_pil

    backend = load_diffusers_zimage(folder)
    decode = load_decoder(folder, backend.device, backend.dtype)
    config = TrainConfig(concept="red", preserve=("blue",), templates=("a photo of a {} ball",), height=64, width=64)
    prompts = backend.encode(["a photo of a red ball", "a photo of a blue ball"])
    plain = to_pil(comparison(backend, prompts, config, decode)[0])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in backend.install(LoRAConfig(rank=2)).parameters():  # B ≠ 0: a LoRA that changes the model
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    erased = to_pil(comparison(backend, prompts, config, decode)[0])
    for row in range(2):
        assert np.array_equal(_cell(plain, row, 0), _cell(plain, row, 1))  # no LoRA: both columns the same model
        assert np.array_equal(_cell(erased, row, 0), _cell(plain, row, 0))
        assert not np.array_equal(_cell(erased, row, 1), _cell(erased, row, 0))


def test_a_vae_of_another_model_is_refused_before_loading_and_a_folder_without_one_draws_nothing(
        folder, tmp_path, monkeypatch, caplog):
    """vae/ is optional (the LoRA is the run's result; the picture shows it), but one whose latents are not the
    transformer's is refused before the run, not after it has trained."""
    import shutil

    import zerase_core.backends.diffusers_loader as loader
    from zerase_core.cli import main

    copy = _copy(folder, tmp_path)
    shutil.rmtree(copy / "vae")
    _vae(latent_channels=4).save_pretrained(copy / "vae")
    with monkeypatch.context() as m:
        m.setattr(loader, "_loaded_whole", lambda *a, **k: pytest.fail("a model loaded before the check"))
        with pytest.raises(ZEraseError, match="vae/ makes 4-channel latents and the transformer takes 16"):
            loader.load_decoder(copy, torch.device("cpu"), torch.float32)
    assert main([*_train_argv(copy), "--out", str(tmp_path / "refused")]) == 2
    assert not (tmp_path / "refused").exists()  # refused before the run made its folder

    shutil.rmtree(copy / "vae")
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="zerase_core.comparison"):
        assert main([*_train_argv(copy), "--out", str(out)]) == 0
    assert (out / "erasure_lora.safetensors").is_file() and not (out / "before_after.png").exists()
    assert "no vae/: no before_after.png" in caplog.text


def _random_lora_file(folder, path):
    """An erasure LoRA of the folder's model that changes it (B ≠ 0), saved as a file."""
    from zerase_core.apply import export_lora
    from zerase_core.backends.diffusers_loader import load_diffusers_zimage
    from zerase_core.lora import LoRAConfig
    from zerase_core.lora_file import save_lora

    backend = load_diffusers_zimage(folder)
    g = torch.Generator().manual_seed(4)
    lora_set = backend.install(LoRAConfig(rank=2))
    with torch.no_grad():
        for p in lora_set.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return save_lora(export_lora(lora_set, concept="red", fingerprint=backend.fingerprint()), path)


def test_compare_draws_prompts_original_and_with_the_files_applied(folder, tmp_path, capsys):
    """`compare` is before_after.png for any prompts and LoRA files: rows of prompts, original | erased, the original
    cells the folder's model without LoRA (bit for bit), the erased ones with the files applied at their strengths."""
    import numpy as np
    from PIL import Image

    from zerase_core.backends.diffusers_loader import load_decoder, load_diffusers_zimage
    from zerase_core.cli import main
    from zerase_core.config import TrainConfig
    from zerase_core.render import to_pil
    from zerase_core.sampling import before_after

    lora = _random_lora_file(folder, tmp_path / "red.safetensors")
    texts = ["a photo of a red ball", "blue sky at night"]
    out = tmp_path / "compare.png"
    argv = ["compare", str(lora), "--model", str(folder), "--prompts", *texts, "--resolution", "64", "--steps", "2",
            "--seed", "3"]
    assert main([*argv, "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(out)
    picture = Image.open(out)
    config = TrainConfig(concept="red", height=64, width=64, seed=3, sample_steps=2, shift=SHIFT)
    backend = load_diffusers_zimage(folder)
    decode = load_decoder(folder, backend.device, backend.dtype)
    for row, prompt in enumerate(backend.encode(texts)):
        original = np.asarray(to_pil(decode(before_after(backend, prompt, config)[0])[0]))
        assert np.array_equal(_cell(picture, row, 0), original)
        assert not np.array_equal(_cell(picture, row, 1), original)
    weaker = tmp_path / "weaker.png"  # strength 0: the LoRA changes nothing, so both columns are the original
    assert main([*argv, "--strengths", "0", "--out", str(weaker)]) == 0
    for row in range(2):
        assert np.array_equal(_cell(Image.open(weaker), row, 1), _cell(picture, row, 0))


def test_train_refuses_a_size_off_the_token_grid_before_the_model_loads(folder, tmp_path, monkeypatch, capsys):
    """compare checked the size against the folder's pixels per token first; train --model told it only once the
    tokenizer, transformer, text encoder and VAE had loaded (minutes and ~40 GB of RAM on the CPU for a typo; a
    review). Nothing is left behind."""
    import zerase_core.backends.diffusers_loader as loader
    from zerase_core.cli import main

    monkeypatch.setattr(loader, "load_diffusers_zimage", lambda *a, **k: pytest.fail("loaded before the check"))
    out = tmp_path / "run"
    argv = ["train", "--model", str(folder), "--concept", "red", "--resolution", "72", "--out", str(out)]
    assert main(argv) == 2
    told = capsys.readouterr().err
    assert "The size must be a multiple of 16 for this Z-Image (its pixels per token); got 72×72" in told
    assert not out.exists()


def test_compare_refuses_before_the_model_loads(folder, tmp_path, monkeypatch, capsys):
    """What would fail after the loads (minutes on the real model) is told first: an --out that exists or is no .png,
    strengths that are not one per file or not finite, a resolution off Z-Image's 16-pixel grid, a folder without
    vae/, an --out that cannot be written (a name too long), a LoRA made for a model of other sizes."""
    import shutil

    import zerase_core.backends.diffusers_loader as loader
    from zerase_core.cli import main

    lora = _random_lora_file(folder, tmp_path / "red.safetensors")
    copy = _copy(folder, tmp_path)
    shutil.rmtree(copy / "vae")
    (tmp_path / "taken.png").write_bytes(b"")
    monkeypatch.setattr(loader, "load_diffusers_zimage", lambda *a, **k: pytest.fail("loaded before the check"))
    base = ["compare", str(lora), "--prompts", "a red ball", "--resolution", "64"]
    for extra, message in (
            (["--model", str(folder), "--out", str(tmp_path / "taken.png")], "taken.png exists"),
            (["--model", str(folder), "--out", str(tmp_path / "a.jpg")], "ending in .png"),
            (["--model", str(folder), "--strengths", "1", "1", "--out", str(tmp_path / "a.png")],
             "--strengths gives 2 values for 1 files"),
            (["--model", str(copy), "--out", str(tmp_path / "a.png")], "has no vae/"),
            (["--model", str(folder), "--out", str(tmp_path / ("x" * 300 + ".png"))], "is too long"),  # unwritable
            # LoRAConfig refused these too, but only at install_lora, after the model and the text encoder had loaded
            (["--model", str(folder), "--strengths", "nan", "--out", str(tmp_path / "a.png")],
             "--strengths must be finite numbers"),
            (["--model", str(folder), "--strengths", "1e39", "--out", str(tmp_path / "a.png")],
             "--strengths must be finite numbers"),
    ):
        assert main([*base, *extra]) == 2 and message in capsys.readouterr().err
    assert main([*base[:-1], "72", "--model", str(folder), "--out", str(tmp_path / "a.png")]) == 2
    assert "multiple of 16" in capsys.readouterr().err
    # a LoRA of another model's sizes, read off transformer/config.json (it was told after the loads)
    import dataclasses

    from zerase_core.lora_file import load_lora, save_lora

    made = load_lora(lora)
    foreign = save_lora(dataclasses.replace(made, fingerprint={**made.fingerprint, "n_layers": 30}),
                        tmp_path / "foreign.safetensors")
    assert main(["compare", str(lora), str(foreign), "--prompts", "a red ball", "--resolution", "64", "--model",
                 str(folder), "--out", str(tmp_path / "a.png")]) == 2
    told = capsys.readouterr().err
    assert "foreign.safetensors: This erasure LoRA was made for a different architecture" in told
    assert "n_layers: LoRA 30 vs model 2" in told
    assert not (tmp_path / "a.png").exists()


def test_a_folder_is_known_by_the_sizes_its_loaded_model_reports(folder, tmp_path):
    """compare checks LoRA files against transformer/config.json before loading and against the loaded model after:
    the same facts either way; a size the config leaves out is not compared."""
    from zerase_core.backends.diffusers_loader import folder_fingerprint, load_diffusers_zimage

    assert folder_fingerprint(folder) == load_diffusers_zimage(folder).fingerprint()
    copy = _copy(folder, tmp_path)
    config = json.loads((copy / "transformer" / "config.json").read_text())
    del config["n_heads"]
    (copy / "transformer" / "config.json").write_text(json.dumps(config))
    assert "n_heads" not in folder_fingerprint(copy) and folder_fingerprint(copy)["n_layers"] == 2


def test_a_vae_out_of_memory_decodes_again_in_tiles(folder, monkeypatch):
    """At 1024² the VAE decodes beside the loaded transformer; on a 16 GB card that may not fit. Then the picture is
    decoded again in tiles (diffusers' enable_tiling) instead of lost; what is not out of memory is raised as it is."""
    from diffusers import AutoencoderKL

    from zerase_core.backends.diffusers_loader import load_decoder

    from diffusers.image_processor import VaeImageProcessor

    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    vae.enable_tiling()  # the tiny VAE's tiles are 4 latent cells a side: this latent is decoded as 4 tiles
    with torch.no_grad():
        tiled = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    tiled = VaeImageProcessor().postprocess(tiled, output_type="pt").permute(0, 2, 3, 1)
    tiling, real = [], AutoencoderKL.decode

    def short_of_memory(self, z, *args, **kwargs):
        tiling.append(self.use_tiling)
        if not self.use_tiling:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, z, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "decode", short_of_memory)
    decode = load_decoder(folder, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(decode(latents), tiled)
    assert tiling == [False, True]
    decode(latents)
    assert tiling == [False, True, True]  # in tiles from then on
    monkeypatch.setattr(AutoencoderKL, "decode", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("other")))
    with pytest.raises(RuntimeError, match="other"):
        load_decoder(folder, torch.device("cpu"), torch.float32)(latents)


def test_the_picture_shows_the_first_erase_prompt_and_at_most_three_kept_concepts():
    """before_after.png's rows: the first template filled with the concept, then the first three preservation concepts
    in that same template (each row costs two samplings of the model), however many templates and concepts the run
    has (the other tests have one of each, so a fourth row or another template passed them)."""
    from zerase_core.comparison import comparison_texts
    from zerase_core.config import TrainConfig

    config = TrainConfig(concept="red", preserve=("blue", "green", "white", "black"),
                         templates=("a photo of a {} ball", "a {} painting"))
    assert comparison_texts(config) == ["a photo of a red ball", "a photo of a blue ball", "a photo of a green ball",
                                        "a photo of a white ball"]


def test_a_picture_that_runs_out_of_memory_is_skipped_and_other_errors_are_raised(tmp_path, caplog):
    """write_comparison runs after the LoRA is written: a picture that does not fit in memory is not worth failing the
    command for (a warning, no file), but an error that is not out of memory is a bug and is raised as it is."""
    from zerase_core.comparison import write_comparison
    from zerase_core.config import TrainConfig
    from zerase_core.tiny import tiny_zimage_backend

    backend = tiny_zimage_backend()
    config = TrainConfig(concept="red", height=64, width=64, sample_steps=2)
    prompts = backend.encode(["a red ball"])

    def short_of_memory(latents):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def broken(latents):
        raise RuntimeError("a bug")

    with caplog.at_level("WARNING", logger="zerase_core.comparison"):
        assert write_comparison(backend, prompts, config, short_of_memory, tmp_path) is None
    assert "before_after.png was not drawn: out of memory" in caplog.text and not any(tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="a bug"):
        write_comparison(backend, prompts, config, broken, tmp_path)


def test_compare_applies_every_file_each_at_its_strength_and_frees_the_text_encoder(folder, tmp_path, capsys,
                                                                                     monkeypatch):
    """Files given together are applied together, each under its own name at its own strength: two files at 0 and 1
    draw what the second alone draws, not the original (the other test gives one file, so applying only the first or
    all under one name passed it). The text encoder is freed once the prompts are encoded (Qwen3-4B: 8 GB beside the
    sampling transformer on a 16-24 GB card), and the printed result names what was drawn."""
    import shutil

    import numpy as np
    from PIL import Image

    from zerase_core.backends.diffusers_zimage import DiffusersZImageBackend
    from zerase_core.cli import main

    lora = _random_lora_file(folder, tmp_path / "red.safetensors")
    other = shutil.copy(lora, tmp_path / "other.safetensors")
    flags = ["--model", str(folder), "--prompts", "a photo of a red ball", "--resolution", "64", "--steps", "2"]
    alone, together = tmp_path / "alone.png", tmp_path / "together.png"
    assert main(["compare", str(lora), *flags, "--out", str(alone)]) == 0
    capsys.readouterr()
    released, real = [], DiffusersZImageBackend.release_encoder
    monkeypatch.setattr(DiffusersZImageBackend, "release_encoder", lambda self: released.append(self) or real(self))
    assert main(["compare", str(other), str(lora), *flags, "--strengths", "0", "1", "--out", str(together)]) == 0
    assert json.loads(capsys.readouterr().out) == {"out": str(together), "prompts": 1,
                                                   "files": [str(other), str(lora)]}
    assert len(released) == 1
    one, both = Image.open(alone), Image.open(together)
    assert np.array_equal(_cell(both, 0, 0), _cell(one, 0, 0))
    assert np.array_equal(_cell(both, 0, 1), _cell(one, 0, 1)) and not np.array_equal(_cell(both, 0, 1),
                                                                                      _cell(both, 0, 0))


def test_compare_refuses_a_lora_of_another_model_and_names_the_file(folder, tmp_path, capsys):
    """A file made for another model is refused, naming the file (which of several does not fit), not applied: a LoRA
    of the tiny built-in model has this folder's widths and would install without a word."""
    from zerase_core.apply import export_lora
    from zerase_core.cli import main
    from zerase_core.lora import LoRAConfig
    from zerase_core.lora_file import save_lora
    from zerase_core.tiny import tiny_zimage_backend

    tiny = tiny_zimage_backend()
    foreign = save_lora(export_lora(tiny.install(LoRAConfig(rank=2)), concept="red", fingerprint=tiny.fingerprint()),
                        tmp_path / "tiny.safetensors")
    good = _random_lora_file(folder, tmp_path / "red.safetensors")
    out = tmp_path / "compare.png"
    assert main(["compare", str(good), str(foreign), "--model", str(folder), "--prompts", "a red ball",
                 "--resolution", "64", "--steps", "2", "--out", str(out)]) == 2
    assert f"{foreign}: This erasure LoRA was made for a different architecture" in capsys.readouterr().err
    assert not out.exists()


def test_compare_draws_as_its_help_says_without_the_optional_flags(folder, tmp_path, monkeypatch):
    """compare's defaults, handed on to the drawing: 1024 pixels a side, Turbo's 8 steps, seed 0, every file at
    strength 1 (every other test gives its own, so other defaults passed them)."""
    import zerase_core.comparison as comparison
    from zerase_core.cli import main

    seen = {}

    def drawn(model, files, texts, strengths, sampling, out):
        seen.update(strengths=list(strengths), sampling=sampling)
        return out

    monkeypatch.setattr(comparison, "compare_files", drawn)
    assert main(["compare", "a.safetensors", "b.safetensors", "--model", str(folder), "--prompts", "a red ball",
                 "--out", str(tmp_path / "compare.png")]) == 0
    sampling = seen["sampling"]
    assert (sampling.height, sampling.width, sampling.sample_steps, sampling.seed) == (1024, 1024, 8, 0)
    assert seen["strengths"] == [1.0, 1.0]


def test_a_vae_is_compared_with_the_transformer_only_where_both_configs_record_their_channels(folder, tmp_path):
    """The channels are compared only where both configs record them: a transformer config without in_channels is
    checked by the loads, not refused as another model's VAE."""
    from zerase_core.backends.diffusers_loader import load_decoder

    copy = _copy(folder, tmp_path)
    path = copy / "transformer" / "config.json"
    config = json.loads(path.read_text())
    del config["in_channels"]
    path.write_text(json.dumps(config))
    assert callable(load_decoder(copy, torch.device("cpu"), torch.float32))


def test_the_vae_moves_to_the_device_at_its_first_decode_not_when_loaded(folder, monkeypatch):
    """load_decoder loads the VAE on the CPU and moves it to the run's device when it first decodes, after the
    training: moved at load, it held GPU memory through the whole run beside the transformer; never moved, the GPU's
    latents met a CPU VAE. On a CPU machine both pass unless the moves are watched."""
    from diffusers import AutoencoderKL

    from zerase_core.backends.diffusers_loader import load_decoder

    moves, real = [], AutoencoderKL.to

    def to(self, *args, **kwargs):
        moves.extend(a for a in (*args, *kwargs.values()) if isinstance(a, torch.device))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "to", to)
    device = torch.device("cpu")
    decode = load_decoder(folder, device, torch.float32)
    assert moves == []
    decode(torch.zeros(1, 16, 8, 8))
    assert moves == [device]


def test_only_a_first_out_of_memory_is_decoded_again_and_the_cache_is_emptied_before(folder, monkeypatch):
    """The tiled retry is for an out of memory of the whole picture's decoding: an error that is not out of memory is
    raised after one try, tiling left off; the failed try's cache is emptied before the tiles (else they meet the same
    full card); an out of memory while already decoding in tiles is raised, not tried again."""
    from diffusers import AutoencoderKL

    import zerase_core.backends.diffusers_loader as loader

    tries, emptied = [], []

    def failing(error):
        def decode(self, z, *args, **kwargs):
            tries.append(self.use_tiling)
            raise error
        return decode

    monkeypatch.setattr(loader, "empty_cache", emptied.append)
    device, latents = torch.device("cpu"), torch.zeros(1, 16, 8, 8)
    monkeypatch.setattr(AutoencoderKL, "decode", failing(RuntimeError("other")))
    with pytest.raises(RuntimeError, match="other"):
        loader.load_decoder(folder, device, torch.float32)(latents)
    assert tries == [False] and emptied == []
    tries.clear()
    monkeypatch.setattr(AutoencoderKL, "decode", failing(torch.OutOfMemoryError("CUDA out of memory")))
    decode = loader.load_decoder(folder, device, torch.float32)
    with pytest.raises(torch.OutOfMemoryError):
        decode(latents)
    assert tries == [False, True] and emptied == [device]
    with pytest.raises(torch.OutOfMemoryError):
        decode(latents)  # in tiles from the first out of memory on: nothing left to try
    assert tries == [False, True, True] and emptied == [device]
