"""The seed paper's application (SPEC section 5): its networks built from the fused block
and its baselines (`models`), the data sets (`data`), training (`train`) and the
five-model comparison (`compare`); `msfused train/compare/params` run them."""
