"""``python -m comfy_poe.training --config run.toml`` (also under ``accelerate launch -m`` / ``torchrun -m``)."""
import sys

from .launch import main

if __name__ == "__main__":
    sys.exit(main())
