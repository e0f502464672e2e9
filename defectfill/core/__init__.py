"""The bottom layer every other package may use: the error users see (`errors`), atomic file writes (`atomic`),
folder claims and locks (`folders`), and the helpers behind the packages' lazy names (`lazy`). It imports
nothing else of defectfill."""
