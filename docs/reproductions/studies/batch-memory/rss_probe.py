import sys, torch, resource
from sigprop.engine import batchmemory
from sigprop.engine.config import Config
from sigprop.engine.trainer import build_config_rule
from sigprop.data import dataset_spec
net, rule, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg=Config(); cfg.model.network=net; cfg.rule.name=rule
r=build_config_rule(cfg, torch.device("cpu")); r.set_training(False)
shape=dataset_spec(cfg.data.dataset).shape
x=torch.randn(n,*shape); y=torch.zeros(n,dtype=torch.long)
r.eval_step(x[:2],y[:2])
base=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r.eval_step(x,y)
peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
per,fixed=batchmemory.measure(r, shape, torch.device("cpu"))
print(net, rule, n, "rss delta MiB", (peak-base)/1024, "measured MiB", (fixed+n*per)/2**20)
