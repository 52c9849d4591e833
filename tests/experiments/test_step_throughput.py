"""The step profile's attribution: instruction -> op_name (a fusion by the
ops inside it) -> model part and phase."""

from experiments import step_throughput

HLO = '''
%fused_computation.3 (param_0: f32[8,16], param_1: f32[16,4]) -> f32[8,4] {
  %param_0 = f32[8,16]{1,0} parameter(0)
  %param_1 = f32[16,4]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,4]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(train_step)/transpose(jvp(mlp_up))/dot_general"}
}

ENTRY %main.9 (Arg_0.1: f32[8,16], Arg_1.2: f32[16,4]) -> f32[8,4] {
  %Arg_0.1 = f32[8,16]{1,0} parameter(0)
  %Arg_1.2 = f32[16,4]{1,0} parameter(1)
  %copy.2 = f32[16,4]{0,1} copy(%Arg_1.2)
  ROOT %ynn_fusion.3 = f32[8,4]{1,0} fusion(%Arg_0.1, %Arg_1.2), kind=kCustom, calls=%fused_computation.3
}
'''


def test_fusions_take_the_op_names_inside_them():
  names = step_throughput.op_names(HLO)
  assert "mlp_up" in names["ynn_fusion.3"]
  assert names["copy.2"] == ""
  assert step_throughput.part_of(names["ynn_fusion.3"], "ynn_fusion.3") == (
      "backward: MLP matmuls")
  assert step_throughput.part_of("", "copy.2").startswith("forward: other")


def test_parts_and_phases():
  part = step_throughput.part_of
  assert part("jit(s)/jvp(attention_op)/exp", "") == "forward: attention op"
  assert part("jit(s)/optimizer/add | jit(s)/transpose(jvp(norm))/mul",
              "") == "optimizer (AdamW, clipping)"
  assert part("jit(s)/jvp()/add | jit(s)/transpose(jvp(gelu))/tanh",
              "") == "backward: GELU"
