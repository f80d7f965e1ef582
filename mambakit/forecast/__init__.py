"""Time-series forecasting with Mamba blocks (`mambakit forecast`), with classical baselines to compare.

    ForecastConfig, Forecaster, Forecast     config → fit on a series → predict the next H steps (forecaster.py)
    MambaForecastNet                         the network (model.py)
    metrics                                  MAE, RMSE, MASE, sMAPE, pinball loss
"""

from .config import ForecastConfig
from .forecaster import Forecast, Forecaster
from .model import MambaForecastNet

__all__ = ["Forecast", "ForecastConfig", "Forecaster", "MambaForecastNet"]
