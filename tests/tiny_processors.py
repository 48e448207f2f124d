"""An image-only Qwen2-VL processor for the tiny Qwen-Image-Edit-Plus test pipeline.

`Qwen2VLProcessor` insists on a video sub-processor, and the video processor needs torchvision, which
these CPU machines do not have. Qwen-Image-Edit-Plus only ever feeds images, so a processor without the
video part is enough.

A pipeline saved with this processor records this module's name (``tiny_processors``) in its
``model_index.json``; diffusers then imports the module when loading and looks ``ProcessorMixin`` up in
it to learn how to load the component. Hence two rules: the module must be importable under this name
(pytest's ``pythonpath = ["tests"]`` does that) and it must export ``ProcessorMixin``.
"""

from transformers import ProcessorMixin, Qwen2VLProcessor

__all__ = ["ProcessorMixin", "Qwen2VLImageOnlyProcessor"]


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` minus the video sub-processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
