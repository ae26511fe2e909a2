"""Loading GPT-2's weights with numpy alone: OpenAI's TensorFlow checkpoints, Hugging Face
safetensors (single file or sharded), the tokenizer, and a downloader."""


class WeightsError(ValueError):
    """A weights file is missing, truncated, corrupt or does not match the config.

    The message always names the file (and the tensor, where there is one).
    """


class DownloadError(WeightsError):
    """A download failed: no source could be reached, or what came back was wrong. The
    command line exits with a status of its own for it (3), not bad usage's 2."""


def read_error(path: str, e: OSError) -> WeightsError:
    """The WeightsError for an OSError met while reading `path`: a missing file, or why it
    cannot be read (a directory, no permission, an I/O error)."""
    if isinstance(e, FileNotFoundError):
        return WeightsError(f"{path}: file not found")
    return WeightsError(f"{path}: cannot read ({e.strerror or e})")
