# gpu_check step c_verify: the bundled JAX reference cases on the GPU (float32; minisam
# verify never uses TF32). Exit 1 if any case is outside tolerance.
"$PY" -m minisam verify "$ROOT"/reference_results/*.npz --device gpu
