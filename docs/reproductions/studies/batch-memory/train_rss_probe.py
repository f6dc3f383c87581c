import sys, torch, resource, time
from sigprop.engine import batchmemory
from sigprop.engine.config import Config
from sigprop.engine.trainer import build_config_rule
from sigprop.data import dataset_spec
net, rule, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg=Config(); cfg.model.network=net; cfg.rule.name=rule
if net.startswith("vgg"): cfg.data.dataset="cifar10"
spec=dataset_spec(cfg.data.dataset)
t=time.time()
per,fixed=batchmemory.measure_train(lambda: build_config_rule(cfg, torch.device("cpu")), spec.shape, 10, torch.device("cpu"))
tm=time.time()-t
r=build_config_rule(cfg, torch.device("cpu")); r.set_training(True)
x=torch.randn(n,*spec.shape); y=torch.arange(n)%10
r.train_step(x[:4],y[:4])
base=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r.train_step(x,y)
peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(net, rule, n, "rss growth MiB %.0f"%((peak-base)/1024), "measured live MiB %.0f"%((fixed+n*per)/2/2**20), "probe %.1fs"%tm)
