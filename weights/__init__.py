"""Loading GPT-2's weights with numpy alone: OpenAI's TensorFlow checkpoints, Hugging Face
safetensors (single file or sharded), the tokenizer, and a downloader."""


class WeightsError(ValueError):
    """A weights file is missing, truncated, corrupt or does not match the config.

    The message always names the file (and the tensor, where there is one).
    """
