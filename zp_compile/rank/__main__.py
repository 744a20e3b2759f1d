"""``torchrun ... -m zp_compile.rank --frontend HOST:PORT``: one serving rank."""

from .worker import main

main()
