from aofp_onnx.cli import main

main()
