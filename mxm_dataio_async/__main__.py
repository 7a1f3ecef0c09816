from mxm_dataio_async._cli import main

main()
