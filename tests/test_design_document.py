"""Every code snippet of the design document (``shared/spec/dmn_framework.md``)
runs as written.

Each test body is the document's code copied verbatim, with only these changes:

* ``simulation.`` / ``training.`` imports are prefixed with ``dmn_neuro.``;
* layer names are passed to ``create_weight_matrix`` (the document omits them;
  its loop passes the lower-case names of ``layer_pairs``);
* the missing ``TrajectoryAnalyzer`` import is added to the workflow example;
* episode counts and lengths are reduced (and ``episode_length_steps`` is given
  to the workflow's ``TrainingConfig`` for that purpose);
* Stage 2 and 4 use names the document defines elsewhere or not at all
  (``w_orn_pn`` ..., ``odor_input``, ``env``): they are defined in a preamble
  marked as such; Stage 2's placeholder ``masks={...}`` becomes ``masks=masks``,
  and Stage 3's dict placeholder line ``...`` (not valid Python) is left out.

After each snippet the test checks what the document claims for it.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _stage1():
    # ---- document, Stage 1: fetch_data.py
    from connectome.fetch_data import FlyWireConnectome

    # Initialize fetcher
    fetcher = FlyWireConnectome(use_cache=True)

    # Fetch synthetic olfactory circuit (or real FlyWire w/ credentials)
    connectome = fetcher.fetch_olfactory_circuit(
        include_layers=['ORN', 'PN', 'KC', 'MBON', 'DN'],
        use_synthetic=False  # Set True to use real FlyWire
    )

    # Get connectivity info
    print(f"Total neurons: {len(connectome['neurons'])}")
    print(f"Total synapses: {connectome['total_synapses']}")
    print(f"Layer sizes: {connectome['layer_sizes']}")
    return connectome


def test_stage1_fetch_data(capsys):
    connectome = _stage1()
    out = capsys.readouterr().out
    sizes = connectome['layer_sizes']
    assert f"Total neurons: {sum(sizes.values())}" in out
    assert set(sizes) == {'ORN', 'PN', 'KC', 'MBON', 'DN'} and sizes['KC'] > 1000
    assert connectome['total_synapses'] == connectome.total_synapses > 0
    assert connectome['source'] == 'flywire_v783_mb'
    first = next(iter(connectome['synapses']))
    assert first.count > 0 and first.pre_id in connectome['neurons']
    with pytest.raises(KeyError, match="keys: neurons"):
        connectome['weights']


def test_stage1_adjacency_matrix(capsys):
    connectome = _stage1()
    # ---- document, Stage 1: adjacency_matrix.py (layer names added)
    from connectome.adjacency_matrix import AdjacencyMatrixGenerator

    generator = AdjacencyMatrixGenerator()

    # Create learnable weight matrices
    weights_orn_pn, mask_orn_pn = generator.create_weight_matrix(
        connectivity_data=connectome, pre_layer='ORN', post_layer='PN',
        normalize=True,
        learnable=True  # Makes it a torch.nn.Parameter
    )

    print(f"Weight shape: {weights_orn_pn.shape}")
    print(f"Sparsity: {(1 - mask_orn_pn.sum() / mask_orn_pn.numel()):.2%}")
    # ---- checks
    sizes = connectome['layer_sizes']
    assert tuple(weights_orn_pn.shape) == (sizes['PN'], sizes['ORN'])
    assert isinstance(weights_orn_pn.raw, torch.nn.Parameter)
    out = capsys.readouterr().out
    density = float(mask_orn_pn.float().mean())
    assert f"Sparsity: {1 - density:.2%}" in out and 0 < density < 0.5


def _stage2_preamble(connectome):
    """Names Stage 2 uses but does not define (preamble, not document code)."""
    from connectome.adjacency_matrix import AdjacencyMatrixGenerator

    gen = AdjacencyMatrixGenerator()
    names = {}
    masks = {}
    for src, dst in [('ORN', 'PN'), ('PN', 'KC'), ('KC', 'MBON'), ('MBON', 'DN')]:
        w, m = gen.create_weight_matrix(connectome, src, dst, normalize=True, learnable=True, gain=3.0)
        names[f"w_{src.lower()}_{dst.lower()}"] = w
        masks[f"mask_{src.lower()}_{dst.lower()}"] = m
    g = torch.Generator().manual_seed(0)
    odor_input = torch.rand(40, 2, connectome['layer_sizes']['ORN'], generator=g) * 2.0
    return names, masks, odor_input


def test_stage2_mechanism():
    connectome = _stage1()
    mats, masks, odor_input = _stage2_preamble(connectome)
    w_orn_pn, w_pn_kc, w_kc_mbon, w_mbon_dn = (mats[k] for k in ("w_orn_pn", "w_pn_kc", "w_kc_mbon", "w_mbon_dn"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # ---- document, Stage 2 (imports prefixed; masks={...} -> masks=masks)
        from dmn_neuro.simulation.mechanism import LIFCell, DifferentiableOlfactoryCircuit

        # Create single LIF population
        lif = LIFCell(
            n_neurons=100,
            tau_ms=20.0,
            threshold_mv=-50.0,
            learnable_tau=True,  # Make time constant learnable
            device='cuda'
        )

        # Single timestep
        I_syn = torch.randn(100)
        spikes, V = lif(I_syn)

        # Full circuit
        circuit = DifferentiableOlfactoryCircuit(
            connectivity_data=connectome,
            weights_orn_pn=w_orn_pn,
            weights_pn_kc=w_pn_kc,
            weights_kc_mbon=w_kc_mbon,
            weights_mbon_dn=w_mbon_dn,
            masks=masks,
            learnable=True
        )

        # Forward pass
        dn_spikes, activations = circuit(odor_input, return_activations=True)
    # ---- checks: one step from rest, on CUDA when there is one (else a warning and the CPU)
    if not torch.cuda.is_available():
        assert any("CUDA" in str(w.message) for w in caught)
    I_dev = I_syn.to(V.device)
    torch.testing.assert_close(V, torch.where(I_dev > lif.threshold, torch.zeros_like(I_dev), I_dev))
    assert torch.equal(spikes, (I_dev > lif.threshold).to(spikes.dtype))
    assert isinstance(lif.raw_beta, torch.nn.Parameter)
    # the circuit uses the given weights (the very objects) and masks, and trains them
    assert circuit.weight('ORN', 'PN') is w_orn_pn and circuit.weight('MBON', 'DN') is w_mbon_dn
    assert dn_spikes.shape == (40, 2, connectome['layer_sizes']['DN'])
    assert activations['spikes']['KC'].shape == (40, 2, connectome['layer_sizes']['KC'])
    assert float(activations['spikes']['PN'].sum()) > 0
    activations['membranes']['MBON'].sum().backward()
    assert w_pn_kc.raw.grad is not None and float(w_pn_kc.raw.grad.abs().sum()) > 0
    assert float(w_pn_kc.raw.grad[~masks['mask_pn_kc']].abs().sum()) == 0.0


def test_stage2_masks_are_used_and_learnable_false_freezes():
    from dmn_neuro.simulation.mechanism import DifferentiableOlfactoryCircuit

    connectome = _stage1()
    mats, masks, odor_input = _stage2_preamble(connectome)
    cut = masks['mask_pn_kc'].clone()
    cut[:, : cut.shape[1] // 2] = False
    circuit = DifferentiableOlfactoryCircuit(connectivity_data=connectome, weights_pn_kc=mats['w_pn_kc'],
                                             masks={'PN->KC': cut}, learnable=False)
    w = circuit.weight('PN', 'KC')()
    assert float(w[~cut].abs().sum()) == 0.0 and float(w[cut].abs().sum()) > 0
    assert not any(p.requires_grad for n, p in circuit.named_parameters() if n.endswith('.raw'))
    from dmn_neuro.errors import ConfigError
    with pytest.raises(ConfigError, match="names no projection"):
        DifferentiableOlfactoryCircuit(connectivity_data=connectome, masks={'mask_dn_orn': cut})


def _stage3():
    # ---- document, Stage 3 (import prefixed; T 5000 -> 500; the '...' placeholder line left out)
    from dmn_neuro.training.loss_functions import CombinedLoss, TrajectoryAnalyzer

    # Create loss function
    loss_fn = CombinedLoss(
        navigation_weight=1.0,
        energy_weight=0.1,
        sparsity_weight=0.01,
        activity_weight=0.001,
        goal_position=(50.0, 50.0, 0.0)
    )

    # Compute loss over trajectory
    positions = torch.randn(500, 3)  # (T, 3)
    velocities = torch.randn(500, 3)
    spikes = {
        'kc': torch.randn(500, 2000) > 0.98,
        'mbon': torch.randn(500, 50) > 0.95,
    }

    losses = loss_fn(positions, velocities, spikes)
    total = losses['total']

    # Analyze trajectory
    metrics = TrajectoryAnalyzer.compute_trajectory_metrics(
        positions, velocities, goal=(50, 50, 0)
    )
    return loss_fn, losses, total, metrics, positions


def test_stage3_loss_functions():
    loss_fn, losses, total, metrics, positions = _stage3()
    assert set(losses) == {'navigation', 'energy', 'sparsity', 'activity', 'total'}
    assert total.dim() == 0 and math.isfinite(float(total))
    expected = sum(w * losses[k] for w, k in ((1.0, 'navigation'), (0.1, 'energy'), (0.01, 'sparsity'),
                                             (0.001, 'activity')))
    torch.testing.assert_close(total, expected)
    assert float(losses['sparsity']) > 0  # ~2.3 % of KCs spike per step: far above the 2 % per-window target
    assert isinstance(metrics['final_distance_to_goal'], float)
    goal = torch.tensor([50.0, 50.0, 0.0])
    assert metrics['final_distance_to_goal'] == pytest.approx(float((positions[-1] - goal).norm()), rel=1e-6)
    assert isinstance(metrics['success'], bool)


def test_stage4_optimizer(in_tmp):
    from dmn_neuro.environment.arena import OdorArena
    from dmn_neuro.simulation.mechanism import DifferentiableOlfactoryCircuit
    from dmn_neuro.training.checkpoint import load_circuit

    connectome = _stage1()
    circuit = DifferentiableOlfactoryCircuit(connectivity_data=connectome)
    loss_fn = _stage3()[0]
    env = OdorArena()  # preamble: the document's `env`
    # ---- document, Stage 4 (import prefixed; 100 episodes of 5000 steps -> 2 of 40)
    from dmn_neuro.training.optimizer import DMNTrainer, TrainingConfig

    # Setup training
    config = TrainingConfig(
        learning_rate=0.001,
        optimizer='adam',
        num_episodes=2,
        episode_length_steps=40,
        nav_weight=1.0,
        energy_weight=0.1
    )

    trainer = DMNTrainer(circuit, loss_fn, config, environment=env)

    # Train!
    losses = trainer.train_episode(num_episodes=2)

    # Save best model
    trainer.save_checkpoint("best_model.pt")
    # ---- checks
    assert len(losses) == 2 and all(math.isfinite(r['total']) for r in losses)
    assert config.loss.navigation_weight == 1.0 and config.loss.energy_weight == 0.1
    assert (in_tmp / "best_model.pt").is_file()
    restored, _ = load_circuit(in_tmp / "best_model.pt")
    for k, v in circuit.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[k], v.cpu(), rtol=0, atol=0)


def test_complete_workflow_example(in_tmp, capsys):
    # ---- document, Complete Workflow Example (imports prefixed, TrajectoryAnalyzer
    # import added, layer names passed, episodes 100 -> 2 and lengths 5000 -> 40)
    import torch
    from connectome.fetch_data import FlyWireConnectome
    from connectome.adjacency_matrix import AdjacencyMatrixGenerator
    from dmn_neuro.simulation.mechanism import DifferentiableOlfactoryCircuit
    from dmn_neuro.training.loss_functions import CombinedLoss, TrajectoryAnalyzer
    from dmn_neuro.training.optimizer import DMNTrainer, TrainingConfig

    # ============ STAGE 1: Load Connectome ============
    print("Loading FlyWire connectome...")
    fetcher = FlyWireConnectome(use_cache=True)
    connectome = fetcher.fetch_olfactory_circuit(
        include_layers=['ORN', 'PN', 'KC', 'MBON', 'DN'],
        use_synthetic=True  # Use False for real FlyWire
    )

    # ============ STAGE 2: Create Weight Matrices ============
    print("Generating weight matrices...")
    generator = AdjacencyMatrixGenerator()

    matrices = {}
    masks = {}
    layer_pairs = [
        ('orn', 'pn'), ('pn', 'kc'), ('kc', 'mbon'), ('mbon', 'dn')
    ]

    for src, dst in layer_pairs:
        weights, mask = generator.create_weight_matrix(
            connectome, src, dst, normalize=True, learnable=True
        )
        matrices[f'w_{src}_{dst}'] = weights
        masks[f'mask_{src}_{dst}'] = mask

    # ============ STAGE 3: Build Network ============
    print("Building differentiable circuit...")
    circuit = DifferentiableOlfactoryCircuit(
        connectivity_data=connectome,
        weights_orn_pn=matrices['w_orn_pn'],
        weights_pn_kc=matrices['w_pn_kc'],
        weights_kc_mbon=matrices['w_kc_mbon'],
        weights_mbon_dn=matrices['w_mbon_dn'],
        masks=masks,
        learnable=True
    )

    # ============ STAGE 4: Setup Loss ============
    print("Creating loss function...")
    loss_fn = CombinedLoss(
        navigation_weight=1.0,
        energy_weight=0.1,
        sparsity_weight=0.01,
        activity_weight=0.001,
        goal_position=(50.0, 50.0, 0.0)
    )

    # ============ STAGE 5: Train ============
    print("Training network with BPTT...")
    config = TrainingConfig(
        num_episodes=2,
        episode_length_steps=40,
        learning_rate=0.001,
        optimizer='adam'
    )

    trainer = DMNTrainer(circuit, loss_fn, config)
    before = matrices['w_pn_kc'].raw.detach().clone()
    losses = trainer.train_episode(num_episodes=2)

    # ============ STAGE 6: Evaluate ============
    print("Evaluating learned network...")
    circuit.eval()
    with torch.no_grad():
        trajectories = trainer.rollout_episode(episode_length=40)
        metrics = TrajectoryAnalyzer.compute_trajectory_metrics(
            trajectories['positions'],
            trajectories['velocities'],
            goal=(50, 50, 0)
        )
        print(f"Final distance to goal: {metrics['final_distance_to_goal']:.2f} mm")
        print(f"Mean distance: {metrics['mean_distance_to_goal']:.2f} mm")
        print(f"Exploration area: {metrics['exploration_area']:.2f} mm²")

    # Save model
    trainer.save_checkpoint("trained_network.pt")
    # ---- checks: the given weights were trained, the file is a loadable single file
    assert len(losses) == 2
    assert circuit.weight('PN', 'KC') is matrices['w_pn_kc']
    assert not torch.equal(before, matrices['w_pn_kc'].raw.detach())
    assert trajectories['positions'].shape == (41, 3)
    out = capsys.readouterr().out
    assert "Final distance to goal:" in out and "Exploration area:" in out
    assert (in_tmp / "trained_network.pt").is_file()
    from dmn_neuro.training.checkpoint import load_circuit

    restored, _ = load_circuit(in_tmp / "trained_network.pt")
    torch.testing.assert_close(restored.weight('PN', 'KC')(), circuit.weight('PN', 'KC')().cpu())
