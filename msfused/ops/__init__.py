"""The fused backends' custom operators (namespace `msfused`): the C++/CUDA extension's
(`extension`), the Triton ones (`triton_ops`, defined at import whenever Triton is
installed), and the helper that registers what each pair of operators needs
(`registration`)."""
