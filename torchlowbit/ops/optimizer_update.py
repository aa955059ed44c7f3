"""``lowbit::optimizer_update_32bit`` / ``lowbit::optimizer_update_8bit_blockwise`` (placeholder)."""
