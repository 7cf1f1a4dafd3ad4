"""loragrid: reproducible LoRA and QLoRA fine-tuning as a Snakemake workflow (one module per stage)."""

import logging

# bitsandbytes' CPU backend, on a CPU with AVX512-BF16, tries to fetch a faster 4-bit kernel from the Hugging Face
# hub through the `kernels` package as it is imported, and warns when it cannot: in every job and every chat, full
# fine-tuning included. loragrid fetches nothing from a hub at run time; bitsandbytes then uses its own kernel.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "from kernels-community" not in record.getMessage()
)
