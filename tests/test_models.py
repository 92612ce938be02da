"""backend/models/loading.py: sources, folder / single-file / pickled loading, devices, the model cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from ldm_export import export_ldm_checkpoint

import backend.models.loading as models
from backend.models.loading import (
    ModelCache,
    ModelLoadError,
    choose_dtype,
    cpu_auto_dtype,
    cpu_flags,
    load_base_model,
    load_controlnet,
    resolve_device,
    resolve_dtype,
    resolve_source,
)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# --------------------------------------------------------------------------- sources


def test_resolve_source(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")
    assert resolve_source("builtin:tiny") == ("folder", str(tiny_models["tiny"]))
    assert resolve_source(str(tmp_path)) == ("folder", str(tmp_path))
    assert resolve_source(str(checkpoint)) == ("file", str(checkpoint))
    assert resolve_source("owner/model") == ("hub", "owner/model")
    assert resolve_source("owner/model/sub/v1.safetensors") == (
        "hub",
        "owner/model/sub/v1.safetensors",
    )


def test_an_existing_local_path_wins_over_the_hub_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "model").mkdir(parents=True)
    (tmp_path / "owner" / "model" / "v1.safetensors").write_bytes(b"")
    assert resolve_source("owner/model") == ("folder", "owner/model")
    assert resolve_source("owner/model/v1.safetensors") == ("file", "owner/model/v1.safetensors")
    assert resolve_source("owner/model/v2.safetensors") == ("hub", "owner/model/v2.safetensors")


@pytest.mark.parametrize(
    "name", ["./missing", "/no/such/model", "a/b/c", "plainname", "C:\\models\\x", "x.safetensors"]
)
def test_unknown_sources_are_refused_without_the_hub(name: str) -> None:
    with pytest.raises(ModelLoadError, match="neither an existing folder") as info:
        resolve_source(name)
    assert f"model {name!r} is neither an existing folder or file nor a hub id: " in str(info.value)


def test_a_file_of_a_hub_repo_must_be_weights() -> None:
    with pytest.raises(ModelLoadError) as info:
        resolve_source("owner/model/unet/config.json")
    assert str(info.value) == (
        "model 'owner/model/unet/config.json' is neither an existing folder or file nor a hub "
        "id: a file of a hub repo must be weights ending in .safetensors (or, with pickled "
        "weights allowed, .ckpt, .bin, .pt, .pth), got 'config.json'"
    )


def test_unknown_builtin_is_a_load_error() -> None:
    with pytest.raises(ModelLoadError, match="builtin:tiny"):
        resolve_source("builtin:giant")


def test_hub_ids_fail_cleanly_offline() -> None:
    """Tests are offline: a hub id must fail as ModelLoadError, not try the network."""
    with pytest.raises(ModelLoadError, match="someone/nothing"):
        load_base_model("someone/nothing")


class Endpoint:
    """A loopback hub endpoint that refuses connections or accepts and never answers;
    ``connections`` counts the connections it accepted."""

    def __init__(self, behaviour: str):
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self.held: list[Any] = []
        if behaviour == "refused":
            self.sock.close()  # nothing listens on the port any more
            return
        self.sock.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self.held.append(conn)  # read nothing, answer nothing

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Take the hub out of offline mode and point it at a loopback Endpoint."""
    from huggingface_hub import constants

    endpoints: list[Endpoint] = []

    def make(behaviour: str) -> Endpoint:
        endpoint = Endpoint(behaviour)
        endpoints.append(endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint.url)
        return endpoint

    yield make
    for endpoint in endpoints:
        endpoint.close()


@pytest.mark.parametrize("behaviour", ["offline", "refused", "silent"])
@pytest.mark.parametrize("loader", [load_base_model, load_controlnet])
def test_a_hub_id_without_network_fails_within_15_s_saying_what_to_do(
    online: Any, behaviour: str, loader: Any
) -> None:
    """With no network a hub id took 263 s of retries to fail (the default model is one)."""
    import time

    # What the loaders import on first use is no retry: on a busy machine the first imports
    # took 12 s, which with the silent hub's 10 s passed the bound. Import before the clock.
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel  # noqa: F401
    from huggingface_hub import HfApi, hf_hub_download  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    if behaviour != "offline":
        online(behaviour)
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        loader("t2vz-tests/not-in-any-cache")
    seconds = time.perf_counter() - started
    text = str(info.value)
    assert seconds < 15, f"{seconds:.1f} s"
    assert "model 't2vz-tests/not-in-any-cache'" in text
    assert "give a local folder or .safetensors file" in text and "pickle" not in text
    reason = {"offline": "HF_HUB_OFFLINE", "refused": "out of reach", "silent": "out of reach"}
    assert reason[behaviour] in text and len(text) < 1000


# --------------------------------------------------------------------------- folders


def test_folder_loads_onto_device_in_eval_mode(tiny_base: Any, tiny_models: dict) -> None:
    assert tiny_base.source == str(tiny_models["tiny"])
    assert tiny_base.device == torch.device("cpu") and tiny_base.dtype == torch.float32
    for module in (tiny_base.unet, tiny_base.vae, tiny_base.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert tiny_base.scheduler_config["_class_name"] == "DDIMScheduler"


def test_a_folder_without_scheduler_gets_sd1x_ddim_and_says_so(
    tiny_models: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """DDIMScheduler's own defaults (linear betas, clip_sample on, no offset) ruin SD 1.x."""
    import backend.engine.pipeline as engine_module

    folder = tmp_path / "no-scheduler"
    shutil.copytree(tiny_models["tiny"], folder)
    shutil.rmtree(folder / "scheduler")
    with caplog.at_level("WARNING", logger="backend.models.loading"):
        base = load_base_model(str(folder))
    assert any("no scheduler/ config" in r.getMessage() for r in caplog.records)
    scheduler = engine_module._ddim(base.scheduler_config)
    config = scheduler.config
    assert (config.beta_schedule, config.steps_offset) == ("scaled_linear", 1)
    assert not config.clip_sample and not config.set_alpha_to_one
    # SD 1.x's schedule, computed independently: betas linear in sqrt from 0.00085 to 0.012.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1 - betas, 0).float()
    torch.testing.assert_close(scheduler.alphas_cumprod, expected)
    scheduler.set_timesteps(50)
    assert scheduler.timesteps[0] == 981 and scheduler.timesteps[-1] == 1  # steps_offset 1


def test_folder_in_another_dtype(tiny_models: dict) -> None:
    base = load_base_model(str(tiny_models["tiny"]), dtype=torch.bfloat16)
    assert base.unet.dtype == torch.bfloat16 and base.vae.dtype == torch.bfloat16


def test_not_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a diffusers model folder"):
        load_base_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="not a diffusers ControlNet folder"):
        load_controlnet(str(tmp_path))


def test_mode_and_unet_channels_must_match(tiny_models: dict) -> None:
    with pytest.raises(ModelLoadError, match="8 input channels"):
        load_base_model(str(tiny_models["tiny"]), pix2pix=True)
    with pytest.raises(ModelLoadError, match="4 channels"):
        load_base_model(str(tiny_models["tiny-pix2pix"]))


# --------------------------------------------------------------------------- single file


@pytest.fixture(scope="module")
def ldm_checkpoint(tiny_models: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline as an original-format (LDM key names) single .safetensors file."""
    return export_ldm_checkpoint(
        tiny_models["tiny"], tmp_path_factory.mktemp("ldm") / "tiny-sd.safetensors"
    )


def test_exported_checkpoint_has_original_key_names(ldm_checkpoint: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(ldm_checkpoint), "pt") as f:
        keys = set(f.keys())
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")
    assert all(k.startswith(prefixes) for k in keys)
    for prefix in prefixes:
        assert any(k.startswith(prefix) for k in keys)
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.decoder.up.0.block.0.conv1.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    ):
        assert key in keys


def test_single_file_checkpoint_loads_the_same_weights(
    ldm_checkpoint: Path, tiny_base: Any, tiny_models: dict
) -> None:
    loaded = load_base_model(str(ldm_checkpoint), config=str(tiny_models["tiny"]))
    same_weights(loaded.unet, tiny_base.unet)
    same_weights(loaded.vae, tiny_base.vae)
    same_weights(loaded.text_encoder, tiny_base.text_encoder)
    assert loaded.tokenizer("a cat").input_ids == tiny_base.tokenizer("a cat").input_ids
    assert loaded.scheduler_config["beta_schedule"] == "scaled_linear"
    assert loaded.source == str(ldm_checkpoint)


def test_single_file_config_must_be_a_folder_or_hub_id(ldm_checkpoint: Path) -> None:
    with pytest.raises(ModelLoadError, match="model_config"):
        load_base_model(str(ldm_checkpoint), config=str(ldm_checkpoint))


def test_single_file_without_local_configs_fails_cleanly_offline(ldm_checkpoint: Path) -> None:
    with pytest.raises(ModelLoadError, match="single-file checkpoint"):
        load_base_model(str(ldm_checkpoint))


def test_shipped_controlnet_config_is_sd15s_unet_as_a_controlnet() -> None:
    """The shipped config is ControlNetModel.from_unet of the SD 1.5 UNet config."""
    import json

    from diffusers import ControlNetModel, UNet2DConditionModel

    repo = Path(__file__).resolve().parent.parent
    unet_config = json.loads((repo / "bench/configs/sd15/unet/config.json").read_text())
    shipped = json.loads((models.SD15_CONTROLNET_CONFIG / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        derived = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
        built = ControlNetModel.from_config(shipped)
    derived_config = json.loads(json.dumps(dict(derived.config)))
    assert {k: v for k, v in shipped.items() if not k.startswith("_")} == {
        k: v for k, v in derived_config.items() if not k.startswith("_")
    }
    assert sum(p.numel() for p in built.parameters()) == 361_279_120  # SD 1.5 ControlNet


def test_local_single_file_controlnet_never_touches_the_network(
    online: Any, tiny_models: dict, tiny_controlnet: Any, tmp_path: Path
) -> None:
    """A local .safetensors ControlNet went to the hub for its config (29 s offline, naming
    a repository the user never chose, with a pickle hint)."""
    endpoint = online("silent")
    single = tmp_path / "my-controlnet.safetensors"
    shutil.copy(tiny_models["tiny-controlnet"] / "diffusion_pytorch_model.safetensors", single)
    loaded = load_controlnet(str(single), config=str(tiny_models["tiny-controlnet"]))
    same_weights(loaded, tiny_controlnet)
    with pytest.raises(ModelLoadError) as info:  # the tiny weights do not fit SD 1.5's config
        load_controlnet(str(single))
    text = str(info.value)
    assert "the SD 1.5 ControlNet config" in text and "--controlnet-config" in text
    assert "pickle" not in text
    assert endpoint.connections == 0


def test_exporter_is_general_over_block_counts() -> None:
    """Round trip through diffusers' own LDM->diffusers conversion for another layout."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from ldm_export import UNET_PREFIX, unet_key_to_ldm

    unet = UNet2DConditionModel(
        sample_size=8,
        layers_per_block=2,
        block_out_channels=(8, 16, 16),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    state = unet.state_dict()
    ldm = {UNET_PREFIX + unet_key_to_ldm(k, 2, {1, 2}): v for k, v in state.items()}
    assert len(ldm) == len(state)
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert back.keys() == state.keys()
    assert all(back[k] is state[k] for k in state)


# --------------------------------------------------------------------------- pickle


def test_pickled_checkpoint_file_is_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not even read")
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load_base_model(str(ckpt))
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load_controlnet(str(ckpt))


def test_unknown_checkpoint_type_is_refused(tmp_path: Path) -> None:
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="unknown checkpoint type"):
        load_base_model(str(onnx), allow_pickle=True)


@pytest.fixture(scope="module")
def pickled_folder(tiny_models: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline with its weights saved only as pickled .bin files."""
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("pickled") / "tiny-bin"
    shutil.copytree(tiny_models["tiny"], folder)
    for sub, stem, bin_name in (
        ("unet", "diffusion_pytorch_model", "diffusion_pytorch_model.bin"),
        ("vae", "diffusion_pytorch_model", "diffusion_pytorch_model.bin"),
        ("text_encoder", "model", "pytorch_model.bin"),
    ):
        weights = folder / sub / f"{stem}.safetensors"
        torch.save(load_file(str(weights)), folder / sub / bin_name)
        weights.unlink()
    return folder


def test_folder_with_only_pickled_weights_is_refused(pickled_folder: Path) -> None:
    with pytest.raises(ModelLoadError, match="--allow-pickle") as info:
        load_base_model(str(pickled_folder))
    assert "pickled" in str(info.value)


def test_allow_pickle_loads_the_pickled_folder(pickled_folder: Path, tiny_base: Any) -> None:
    loaded = load_base_model(str(pickled_folder), allow_pickle=True)
    same_weights(loaded.unet, tiny_base.unet)
    same_weights(loaded.text_encoder, tiny_base.text_encoder)


def test_controlnet_folder_with_only_pickled_weights(
    tiny_models: dict, tiny_controlnet: Any, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    folder = tmp_path / "cn"
    shutil.copytree(tiny_models["tiny-controlnet"], folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), folder / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load_controlnet(str(folder))
    same_weights(load_controlnet(str(folder), allow_pickle=True), tiny_controlnet)


# --------------------------------------------------------------------------- devices


def test_devices_and_dtypes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_flags", lambda: frozenset({"avx2"}))  # no native bf16
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelLoadError, match="no CUDA"):
        resolve_device("cuda")
    if not torch.backends.mps.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ModelLoadError, match="MPS"):
            resolve_device("mps")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


# /proc/cpuinfo excerpts: an AMX Xeon (Sapphire Rapids), a Zen 4 EPYC with AVX-512 BF16, an
# AVX-512 Xeon without bf16 (oneDNN emulates it there), this project's AMD EPYC (AVX2).
XEON_AMX = "vendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
EPYC_ZEN4 = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
XEON_AVX512 = "vendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512f avx512bw avx512vl\n"
EPYC_AVX2 = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 fma\n"


@pytest.mark.parametrize(
    ("cpuinfo", "expected", "because"),
    [
        (XEON_AMX, torch.bfloat16, "amx_bf16, avx512_bf16"),
        (EPYC_ZEN4, torch.bfloat16, "avx512_bf16"),  # AMD with the flag: bf16 (no vendor rule)
        (XEON_AVX512, torch.float32, "no native bf16"),  # Intel without it: fp32
        (EPYC_AVX2, torch.float32, "no native bf16"),
    ],
)
def test_auto_dtype_on_cpu_follows_native_bf16_flags(
    tmp_path: Path, cpuinfo: str, expected: torch.dtype, because: str
) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(cpuinfo)
    choice = cpu_auto_dtype(cpu_flags(info))
    assert choice.dtype == expected
    assert because in choice.reason


def test_auto_dtype_reads_the_cpu_flags_on_the_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    # Explicit choices and CUDA are not affected by the CPU's flags.
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    monkeypatch.setattr(models, "cpu_flags", lambda: frozenset({"avx2"}))
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="got 'half'"):
        choose_dtype("half", torch.device("cpu"))


def test_auto_dtype_falls_back_to_float32_without_cpu_flags(tmp_path: Path) -> None:
    assert cpu_flags(tmp_path / "missing") is None  # not Linux, or /proc unreadable
    no_flags_line = tmp_path / "cpuinfo"
    no_flags_line.write_text("processor\t: 0\n")
    assert cpu_flags(no_flags_line) is None
    choice = cpu_auto_dtype(None)
    assert choice.dtype == torch.float32 and "unreadable" in choice.reason


# --------------------------------------------------------------------------- cache


class FakeLoads:
    """Stands in for the loaders: counts calls, returns a fresh object per load."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, name: str, **kwargs: Any) -> object:
        self.calls.append((name, kwargs))
        return object()


def test_model_cache_reuses_and_evicts(monkeypatch: pytest.MonkeyPatch) -> None:
    bases, controlnets = FakeLoads(), FakeLoads()
    monkeypatch.setattr(models, "load_base_model", bases)
    monkeypatch.setattr(models, "load_controlnet", controlnets)
    cache = ModelCache(max_bases=1, max_controlnets=2)

    a = cache.base("A", pix2pix=False, dtype=torch.float32)
    assert cache.base("A", dtype=torch.float32, pix2pix=False) is a  # kwargs order is irrelevant
    assert cache.loads == 1
    assert cache.base("A", pix2pix=False, dtype=torch.float16) is not a  # other options: reload
    assert cache.base("B", pix2pix=False, dtype=torch.float32) is not a
    assert cache.base("A", pix2pix=False, dtype=torch.float32) is not a  # evicted (max 1)
    assert cache.loads == 4 and len(bases.calls) == 4

    c1, c2 = cache.controlnet("c1"), cache.controlnet("c2")
    assert cache.controlnet("c1") is c1  # now the most recently used
    cache.controlnet("c3")  # evicts c2, the least recently used
    assert cache.controlnet("c1") is c1
    assert cache.controlnet("c2") is not c2
    assert [name for name, _ in controlnets.calls] == ["c1", "c2", "c3", "c2"]
    assert cache.loads == 8


def test_model_cache_loads_real_models_once(tiny_models: dict) -> None:
    cache = ModelCache()
    first = cache.base("builtin:tiny", pix2pix=False)
    assert cache.base("builtin:tiny", pix2pix=False) is first
    assert cache.controlnet("builtin:tiny-controlnet") is cache.controlnet(
        "builtin:tiny-controlnet"
    )
    assert cache.loads == 2


# --------------------------------------------------------------------------- hostile files


def short_naming(message: str, name: str) -> None:
    """An error of at most 3 lines that names ``name`` (a file or a field)."""
    assert name in message, message
    assert len(message.splitlines()) <= 3, message


HOSTILE_CODE = """
from pathlib import Path
Path({marker!r}).write_text("the model's own code ran")
from transformers import CLIPTextModel as Evil
"""


def hostile_config_folder(tiny: Path, folder: Path, marker: Path) -> Path:
    """The tiny model's configs as a stranger could ship them: model_index.json names
    transformers' AutoModel, text_encoder/config.json maps it to a .py file beside it that
    writes ``marker`` when run."""
    shutil.copytree(tiny, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", "AutoModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoModel": "evil.Evil", "AutoConfig": "evil.EvilConfig"}
    config["model_type"] = "evil"  # no class of transformers' own: only the .py could load it
    config_path.write_text(json.dumps(config))
    (folder / "text_encoder" / "evil.py").write_text(HOSTILE_CODE.format(marker=str(marker)))
    return folder


def test_a_config_folder_asking_for_custom_code_is_refused_and_runs_nothing(
    ldm_checkpoint: Path, tiny_models: dict, tmp_path: Path
) -> None:
    marker = tmp_path / "marker.txt"
    folder = hostile_config_folder(tiny_models["tiny"], tmp_path / "configs", marker)
    for load in (
        lambda: load_base_model(str(ldm_checkpoint), config=str(folder)),  # single file
        lambda: load_base_model(str(folder)),  # the folder as a model
    ):
        with pytest.raises(ModelLoadError) as info:
            load()
        short_naming(str(info.value), str(folder / "text_encoder" / "config.json"))
        assert "auto_map" in str(info.value)
    assert not marker.exists()


def test_transformers_never_prompts_for_custom_code_once_loading_has_run(
    tiny_models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past our own checks, transformers refuses the code instead of asking on stdin."""
    from transformers import AutoModel

    marker = tmp_path / "marker.txt"
    folder = hostile_config_folder(tiny_models["tiny"], tmp_path / "configs", marker)
    models.forbid_remote_code()

    prompts: list[str] = []

    def answer_no(prompt: str = "") -> str:
        prompts.append(prompt)
        return "n"

    monkeypatch.setattr("builtins.input", answer_no)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModel.from_pretrained(str(folder / "text_encoder"))
    assert prompts == []  # refused outright: nothing read stdin
    assert not marker.exists()


def test_a_model_index_naming_any_module_is_refused_before_importing_it(
    ldm_checkpoint: Path, tiny_models: dict, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    import sys

    folder = tmp_path / "configs"
    shutil.copytree(tiny_models["tiny"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["this", "X"]  # importing `this` prints the Zen of Python
    (folder / "model_index.json").write_text(json.dumps(index))
    sys.modules.pop("this", None)
    with pytest.raises(ModelLoadError) as info:
        load_base_model(str(ldm_checkpoint), config=str(folder))
    short_naming(str(info.value), str(folder / "model_index.json"))
    assert "'scheduler'" in str(info.value)
    assert "this" not in sys.modules
    assert "Beautiful is better" not in capfd.readouterr().out


def test_a_lora_or_embedding_given_as_a_model_says_so(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    lora = tmp_path / "style.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 32),
            "lora_unet_down_blocks_0.lora_up.weight": torch.zeros(32, 4),
        },
        str(lora),
    )
    embedding = tmp_path / "shiny.safetensors"
    save_file({"emb_params": torch.zeros(2, 768)}, str(embedding))
    for path, switch in ((lora, "--lora"), (embedding, "--embedding")):
        with pytest.raises(ModelLoadError) as info:
            load_base_model(str(path))
        short_naming(str(info.value), str(path))
        assert switch in str(info.value)


def test_broken_safetensors_are_named(ldm_checkpoint: Path, tmp_path: Path) -> None:
    import struct

    data = ldm_checkpoint.read_bytes()
    cases = {
        "empty.safetensors": (b"", "too short"),
        "bomb.safetensors": (struct.pack("<Q", 1 << 62) + b"{}", "header claims"),
        "truncated.safetensors": (data[: len(data) // 2], "truncated"),
    }
    for name, (content, why) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ModelLoadError) as info:
            load_base_model(str(path))
        short_naming(str(info.value), str(path))
        assert why in str(info.value)


def test_a_config_asking_for_an_absurd_unet_is_refused_before_allocating(
    tiny_models: dict, tmp_path: Path
) -> None:
    folder = tmp_path / "huge"
    shutil.copytree(tiny_models["tiny"], folder)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["block_out_channels"] = [16384, 16384]  # 90.7 G parameters, 363 GB in float32
    config["norm_num_groups"] = 8
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as info:
        load_base_model(str(folder))
    short_naming(str(info.value), str(config_path))
    assert "G parameters" in str(info.value)
    config["block_out_channels"], config["layers_per_block"] = [32, 64], 10_000_000
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="layers_per_block") as info:
        load_base_model(str(folder))
    short_naming(str(info.value), str(config_path))


def test_a_5000_character_hub_id_is_one_line_naming_the_limit() -> None:
    for name in ("a" * 5000, "owner/" + "n" * 5000, "a/" * 2500):
        with pytest.raises(ModelLoadError) as info:
            load_base_model(name)
        text = str(info.value)
        assert len(text.splitlines()) == 1 and len(text) < 300, text
        assert "512 characters" in text or "File name too long" in text


def test_a_controlnet_config_asking_for_an_absurd_size_is_refused(
    tiny_models: dict, tmp_path: Path
) -> None:
    folder = tmp_path / "huge-controlnet"
    shutil.copytree(tiny_models["tiny-controlnet"], folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["block_out_channels"] = [16384] * len(config["block_out_channels"])
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as info:
        load_controlnet(str(folder))
    short_naming(str(info.value), str(config_path))
    assert "ControlNetModel of" in str(info.value)
