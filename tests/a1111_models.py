"""A1111's documented response models (modules/api/models.py of AUTOMATIC1111/stable-diffusion-webui), as they
declare them: a response that does not validate here would break A1111 clients."""
from __future__ import annotations

from pydantic import BaseModel


class TextToImageResponse(BaseModel):
    images: list[str] | None = None
    parameters: dict
    info: str


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict
    current_image: str | None = None
    textinfo: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None
    default_rho: float | None
    need_inner_model: bool | None


class UpscalerItem(BaseModel):
    name: str
    model_name: str | None
    model_path: str | None
    model_url: str | None
    scale: float | None


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None


class SDVaeItem(BaseModel):
    model_name: str
    filename: str


class FaceRestorerItem(BaseModel):
    name: str
    cmd_dir: str | None


class EmbeddingItem(BaseModel):
    step: int | None
    sd_checkpoint: str | None
    sd_checkpoint_name: str | None
    shape: int
    vectors: int


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, EmbeddingItem]
    skipped: dict[str, EmbeddingItem]


class ScriptsList(BaseModel):
    txt2img: list | None = None
    img2img: list | None = None


class ScriptArg(BaseModel):
    label: str | None = None
    value: object | None = None
    minimum: object | None = None
    maximum: object | None = None
    step: object | None = None
    choices: list[str] | None = None


class ScriptInfo(BaseModel):
    name: str | None = None
    is_alwayson: bool | None = None
    is_img2img: bool | None = None
    args: list[ScriptArg]


class LoraItem(BaseModel):  # the built-in Lora extension's /sdapi/v1/loras
    name: str
    alias: str
    path: str
    metadata: dict


