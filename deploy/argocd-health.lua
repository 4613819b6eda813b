-- Argo CD custom health check for workorder.dev/WorkOrder (resource.customizations.health.workorder.dev_WorkOrder).
-- Reads the kstatus-style conditions the operator and agents keep on every order:
--   Succeeded=True                    -> Healthy     (Completed)
--   Stalled=True or Succeeded=False   -> Degraded    (Failed: out of retries, or refused)
--   anything else                     -> Progressing (Pending, Claimed, RetryPending), with the
--                                        Succeeded condition's message when there is one
local hs = {}
local succeeded = nil
local stalled = nil
if obj.status ~= nil and obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    if condition.type == "Succeeded" then
      succeeded = condition
    elseif condition.type == "Stalled" then
      stalled = condition
    end
  end
end

local function message_of(condition, default)
  if condition ~= nil and condition.message ~= nil and condition.message ~= "" then
    return condition.message
  end
  return default
end

if succeeded ~= nil and succeeded.status == "True" then
  hs.status = "Healthy"
  hs.message = message_of(succeeded, "WorkOrder completed")
elseif stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = message_of(stalled, message_of(succeeded, "WorkOrder failed"))
elseif succeeded ~= nil and succeeded.status == "False" then
  hs.status = "Degraded"
  hs.message = message_of(succeeded, "WorkOrder failed")
else
  hs.status = "Progressing"
  hs.message = message_of(succeeded, "Waiting for an agent to claim and run the WorkOrder")
end
return hs
