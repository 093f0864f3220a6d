"""The certification pipeline's stages, one module each (`invarlock.certify` runs them in
order): inputs → plan → baseline → subject → judge → write, with the records they hand each
other in `records`."""
