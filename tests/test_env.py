from parallel.env import detect


def test_torchrun_variables():
    env = detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == (
        3,
        4,
        1,
        "h0",
        1234,
        "torchrun",
    )


def test_slurm_variables():
    env = detect(
        {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "42", "MASTER_ADDR": "node7"}
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (5, 8, 1, "node7", "slurm")
    assert env.master_port == 20042  # same on every task of the job, without coordination


def test_torchrun_wins_over_slurm_inside_an_allocation():
    env = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "RANK": "1", "WORLD_SIZE": "2"})
    assert env.launcher == "torchrun" and env.world_size == 2


def test_single_process():
    env = detect({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single") and env.master_port > 0
