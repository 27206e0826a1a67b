"""Run under torchrun with 2 processes by tests/test_fsdp.py: the same tiny pre-training with DDP and with
--fsdp (sharded checkpoints), then an --fsdp run resumed on 2 ranks from the sharded epoch-0 checkpoint.

    torchrun --nproc_per_node=2 tests/fsdp_worker.py OUT_DIR DATA_PATH
"""
import sys
import warnings

import torch.distributed as dist

import run_pretraining_multimae as script
import utils.runner

TINY = ["--model", "pretrain_multimae_tiny", "--encoder_depth", "2", "--input_size", "32", "--patch_size", "8",
        "--num_encoded_tokens", "12", "--decoder_dim", "32", "--decoder_depth", "1", "--decoder_num_heads", "2",
        "--batch_size", "4", "--epochs", "2", "--max_steps_per_epoch", "2", "--warmup_epochs", "1", "--blr", "2e-2",
        "--task_balancer", "uncertainty", "--num_workers", "0", "--device", "cpu", "--print_freq", "1",
        "--save_vis_freq", "0", "--save_ckpt_freq", "1", "--deterministic", "--clip_grad", "1.0"]


def run(*argv: str):
    return script.main(script.parse_config([*TINY, *argv], exit_on_error=False))


def keep_process_group() -> None:
    """Three runs share one process group (a second init under torchrun collides in its store)."""
    init = dist.init_process_group
    dist.init_process_group = lambda *a, **k: None if dist.is_initialized() else init(*a, **k)
    utils.runner.destroy_distributed = lambda: None


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    keep_process_group()
    out, data = sys.argv[1], sys.argv[2]
    run("--data_path", data, "--output_dir", f"{out}/ddp")
    run("--data_path", data, "--output_dir", f"{out}/fsdp", "--fsdp")
    run("--data_path", data, "--output_dir", f"{out}/resumed", "--fsdp", "--resume", f"{out}/fsdp/checkpoint-0.pth")
