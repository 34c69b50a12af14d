"""fedavg_lora"""
