"""How many tokens ``chunked_mlp`` runs a block's MLP on at a time; ``compile_blocks`` leaves the sequences longer
than that to it (eager), where the memory bound matters more than the fusion."""

CHUNK_TOKENS = 32768
