"""Run aofp-onnx from a checkout: `python cli.py inspect MODEL`. Delegates to aofp_onnx.cli."""
from aofp_onnx.cli import main

if __name__ == "__main__":
    main()
