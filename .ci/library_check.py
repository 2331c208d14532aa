"""The library without the trainer: `make DIR` (with the full install) writes a tiny model file and
an image into DIR; `check DIR` (in a venv with a plain `pip install .`) asserts that the trainer's
dependencies are absent, then loads the model and encodes text and the image."""
import importlib.util
import sys
from pathlib import Path

TRAINER_ONLY = ("deepspeed", "tensorboard", "matplotlib")


def make(folder: Path) -> None:
    from PIL import Image
    from proalign.config import load_config
    from proalign.models.proclip import ProCLIP
    folder.mkdir(parents=True, exist_ok=True)
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
    ProCLIP.from_config(load_config(config, [f"output_dir={folder / 'run'}"])).save(folder / "tiny.safetensors")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / "red.png")


def check(folder: Path) -> None:
    present = [name for name in TRAINER_ONLY if importlib.util.find_spec(name)]
    assert not present, f"a plain install pulled in the trainer's {present}"
    import proalign
    model, _, _ = proalign.load(str(folder / "tiny.safetensors"), device="cpu")
    text = model.encode_text(["a red heart", "ein rotes Herz"])
    image = model.encode_image(str(folder / "red.png"))
    assert text.shape[0] == 2 and text.shape[1] == image.shape[0], (text.shape, image.shape)
    print(f"library only: load, encode_text {tuple(text.shape)}, encode_image {tuple(image.shape)}; "
          f"not installed: {', '.join(TRAINER_ONLY)}")


if __name__ == "__main__":
    {"make": make, "check": check}[sys.argv[1]](Path(sys.argv[2]))
