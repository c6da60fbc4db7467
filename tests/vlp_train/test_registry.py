"""vlp_train.registry: the one rule of the named registries (model families, fine-tuning tasks)."""
import pytest


def test_a_name_registers_once_and_an_unknown_name_is_refused_naming_the_choices():
    from vlp_train.families import FAMILIES, family_of, register
    from vlp_train.finetune.tasks import TASKS, task_of
    from vlp_train.finetune.tasks import register as register_task

    assert family_of("vlmo") is FAMILIES["vlmo"] and task_of("vqa") is TASKS["vqa"]
    with pytest.raises(ValueError, match="model family 'vlmo' registered twice"):
        register(FAMILIES["vlmo"])
    with pytest.raises(ValueError, match="task 'vqa' registered twice"):
        register_task(TASKS["vqa"])
    with pytest.raises(ValueError, match=r"model.arch='vlmo2': unknown model family \(choose from \[.*'vlmo'"):
        family_of("vlmo2")
    with pytest.raises(ValueError, match=r"task.name='vqa3': unknown task \(choose from \[.*'vqa'"):
        task_of("vqa3")
    assert {"single_stream", "vlmo", "vlmae"} <= set(FAMILIES) and "retrieval" in TASKS


def test_every_fine_tuning_task_has_its_preset_and_the_cli_offers_them():
    """finetune/tasks.py's registry and finetune/config.py's presets name the same tasks (the CLI's
    --task choices are the presets')."""
    from vlp_train.cli import FINETUNE_TASKS
    from vlp_train.finetune.config import PRESETS
    from vlp_train.finetune.tasks import TASKS

    assert set(TASKS) == set(PRESETS) == set(FINETUNE_TASKS)
