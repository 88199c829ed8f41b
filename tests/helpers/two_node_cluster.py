"""A two-node Ray cluster on this machine (two raylets, 1 CPU each) for the multinode_* helpers,
on loopback as cluster.start's own local cluster: nothing listens beyond it."""

from ray.cluster_utils import Cluster

from rayclip.cluster import LOOPBACK


def start() -> Cluster:
    head = {"num_cpus": 1, "include_dashboard": False, "node_ip_address": LOOPBACK}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)
    cluster.wait_for_nodes()
    return cluster


def off_loopback(cluster: Cluster) -> list[str]:
    """The addresses beyond loopback of the cluster's nodes and of every driver that joined it (a
    `rayclip` command with $RAY_ADDRESS takes the address of the node it finds on this machine)."""
    nodes = [node["NodeManagerAddress"] for node in cluster.global_state.node_table()]
    drivers = [job["DriverIPAddress"] for job in cluster.global_state.job_table()]
    return [address for address in nodes + drivers if address != LOOPBACK]
