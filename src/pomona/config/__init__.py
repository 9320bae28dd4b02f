"""Settings: one small dataclass per concern, and one per subcommand of the `pomona` command.

Each field carries a docstring right below it; the CLI turns those into `--help`, and a `Literal[...]` type into
the choices a flag accepts (checked when the command line is parsed, and when a config file is read).
A run's settings are one `Config` object (data, model, train, balance); a config file (YAML or JSON) holds only
the fields it changes, like flax's config overrides: `pomona train --config configs/frozen.json`. The run folder
keeps the full resolved config in `config.json`, so a run can be repeated or resumed from it.

This package imports nothing heavy: the CLI builds its parser from it without loading PyTorch.

The run's settings and overrides are `run`, the checks of values and config files `values`, `pomona tune`'s
settings `tuning`, and those of each subcommand `commands`; every public name is importable from `pomona.config`.
"""

from .commands import (ARMS, MODEL_PRESETS, AblateCommand, AblationSettings, BalanceCommand, DoctorCommand,
                       EvaluateCommand, ExplainCommand, ExportCommand, FetchCommand, PredictCommand, PreviewCommand,
                       ReportCommand, ScoringConfig, ServeCommand, SuggestCommand, TrainCommand, TuneCommand,
                       apply_size)
from .run import (MAX_ASPECT, RENAMED, SECTIONS, BalanceConfig, Config, DataConfig, Engine, FeatureEngine, InputConfig,
                  ModelConfig, TrainConfig, View, apply_params, merge, set_field)
from .tuning import TRACKER_PACKAGES, TUNE_DEFAULTS, SearchParam, TuneConfig, default_search_space, load_search_space
from .values import (BOUNDS, choices, field_docs, has_type, load_overrides, np_bool_types, out_of_range, range_problems,
                     type_name)

__all__ = ["ARMS", "MODEL_PRESETS", "AblateCommand", "AblationSettings", "BalanceCommand", "DoctorCommand",
           "EvaluateCommand", "ExplainCommand", "ExportCommand", "FetchCommand", "PredictCommand", "PreviewCommand",
           "ReportCommand", "ScoringConfig", "ServeCommand", "SuggestCommand", "TrainCommand", "TuneCommand",
           "apply_size", "MAX_ASPECT", "RENAMED", "SECTIONS", "BalanceConfig", "Config", "DataConfig", "Engine",
           "FeatureEngine", "InputConfig", "ModelConfig", "TrainConfig", "View", "apply_params", "merge", "set_field",
           "TRACKER_PACKAGES", "TUNE_DEFAULTS", "SearchParam", "TuneConfig", "default_search_space",
           "load_search_space", "BOUNDS", "choices", "field_docs", "has_type", "load_overrides", "np_bool_types", "out_of_range",
           "range_problems", "type_name"]
