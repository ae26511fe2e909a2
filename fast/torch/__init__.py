"""GPT-2 in torch: plain torch ops (`backend.py`), the model that runs them or the Triton
kernels (`model.py`), and its trainer (`train.py`)."""
