"""Small rules shared by several parts: argument checks (`checks`), which monitored value is
best (`ranking`), when a trigger fires (`triggers`), naming a pytree leaf (`tree_paths`)."""
