"""The pytest plugin's machinery; the plugin itself is :mod:`mxm_dataio_async.pytest_plugin`."""
