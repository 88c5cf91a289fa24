"""ComfyUI's stock LoRA loading must not recognise a native erasure LoRA (it would apply it ungated)."""

from comfy_support import require_comfyui, tiny_zimage

comfy = require_comfyui()
import torch  # noqa: E402

from zerase_core.lora_file import ErasureLoRA, save_lora  # noqa: E402


def test_stock_lora_loader_maps_no_key_of_an_erasure_lora(tmp_path):
    import importlib

    # (imported by name: a plain `import comfy.lora` here would shadow the module-level `comfy`)
    lora_mod, sd, utils = (importlib.import_module(f"comfy.{m}") for m in ("lora", "sd", "utils"))
    model = tiny_zimage(comfy, seed=0)
    factors = {(i, p): (torch.randn(2, 256), torch.randn(256, 2)) for i in range(2) for p in "qkv"}
    path = save_lora(ErasureLoRA(factors, concept="cat"), tmp_path / "cat.safetensors")
    key_map = lora_mod.model_lora_keys_unet(model.model, {})
    assert any("attention.qkv" in str(v) for v in key_map.values())  # it does know how to patch qkv ...
    patches = lora_mod.load_lora(utils.load_torch_file(str(path)), key_map)
    assert patches == {}  # ... but finds nothing to patch in our file
    # and the stock loader node path leaves the model's weights untouched
    patched, _ = sd.load_lora_for_models(model, None, utils.load_torch_file(str(path)), 1.0, 0.0)
    assert patched.patches == {}


def test_stock_lora_loader_applies_an_official_z_erase_file_ungated(tmp_path):
    """What the README warns of: an official file's diffusers names are ones ComfyUI maps onto qkv, so LoraLoader
    applies it to every token. Should ComfyUI stop mapping them, the README's warning is out of date."""
    import importlib

    from safetensors.torch import save_file

    from zerase_core.lora_file import load_lora

    lora_mod, utils = (importlib.import_module(f"comfy.{m}") for m in ("lora", "utils"))
    model = tiny_zimage(comfy, seed=0)
    official = {f"transformer.layers.{i}.attention.to_{p}.lora_{part}.weight": torch.randn(*shape)
                for i in range(2) for p in "qkv" for part, shape in (("down", (2, 256)), ("up", (256, 2)))}
    save_file(official, str(tmp_path / "official.safetensors"))
    assert load_lora(tmp_path / "official.safetensors").source == "official-z-erase"  # Apply reads it, gated
    patches = lora_mod.load_lora(utils.load_torch_file(str(tmp_path / "official.safetensors")),
                                 lora_mod.model_lora_keys_unet(model.model, {}))
    assert {k if isinstance(k, str) else k[0] for k in patches} == {
        f"diffusion_model.layers.{i}.attention.qkv.weight" for i in range(2)}  # the whole qkv, image tokens too
